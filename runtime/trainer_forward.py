"""The trainer-side forward of deterministic inference: per-token logprobs of a transformers causal LM
(Llama family: Llama/SmolLM2, Qwen2, Qwen3, Mistral) computed with the rollout's batch-invariant kernels,
with autograd.

A server started with `--enable-deterministic-inference` computes every token's logprob in an order that
depends on nothing but the token's own sequence; this module computes all positions of a batch of sequences
at once in that same order, on the transformers model's own parameters (q/k/v and gate/up are concatenated
per call, as the server fuses them, so gradients reach the HF parameters). The logprob a trainer gets for a
token is then bitwise the one the rollout reported: the importance ratio is exactly 1 on fresh weights.

    forward = TrainerForward(hf_model)
    logps = forward.token_logprobs(seqs, starts)   # list of [len(s) - start] tensors with gradients
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kernels.batch_invariant import invariant_attention, invariant_linear, padded_key_len
from kernels.rmsnorm import add_rms_norm, rms_norm
from kernels.rotary import apply_rotary
from runtime.attention.batch_invariant_backend import output_rows, query_rows, row_positions
from runtime.models.activations import activation
from runtime.models.layers import RotaryTable
from runtime.models.llama import sliding_window_of_layer
from runtime.sampler import processed_logprobs


def _bias(*linears: nn.Linear) -> torch.Tensor | None:
    if linears[0].bias is None:
        return None
    return torch.cat([lin.bias for lin in linears])


class TrainerForward:
    """Wraps (does not copy) a transformers `*ForCausalLM` of the Llama family; fp32 on CPU."""

    def __init__(self, model: nn.Module):
        self.model = model
        config = model.config
        self.config = config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scale = self.head_dim ** -0.5
        self.eps = config.rms_norm_eps
        self.act = activation(config.hidden_act)
        layers = model.model.layers
        if any(not hasattr(layer.mlp, "gate_proj") for layer in layers):
            raise ValueError("TrainerForward supports dense decoders only (no mixture-of-experts layers).")
        self.windows = [sliding_window_of_layer(config, i) for i in range(len(layers))]
        device = model.model.embed_tokens.weight.device
        if device.type != "cpu":
            raise ValueError(f"TrainerForward runs the CPU batch-invariant kernels; the model is on {device}.")
        # The server's table (fp32, computed once), not transformers' per-call product: the same bits.
        self.rotary = RotaryTable(config, self.head_dim, config.max_position_embeddings)

    def hidden_states(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids [B, W] (right-padded), lengths [B] -> final normed hidden states [B * W, hidden]."""
        b, w = ids.shape
        base = self.model.model
        positions = torch.arange(w).expand(b, w)
        rope = self.rotary(positions.reshape(-1), base.embed_tokens.weight.dtype)
        h = F.embedding(ids.reshape(-1), base.embed_tokens.weight)
        residual = None
        for layer, window in zip(base.layers, self.windows):
            if residual is None:
                residual, x = h, rms_norm(h, layer.input_layernorm.weight, self.eps)
            else:
                x, residual = add_rms_norm(h, residual, layer.input_layernorm.weight, self.eps)
            x = self._attention(layer.self_attn, x, rope, positions, lengths, w, window)
            x, residual = add_rms_norm(x, residual, layer.post_attention_layernorm.weight, self.eps)
            h = self._mlp(layer.mlp, x)
        return add_rms_norm(h, residual, base.norm.weight, self.eps)[0]

    def _attention(self, attn: nn.Module, x: torch.Tensor, rope, positions: torch.Tensor, lengths: torch.Tensor,
                   width: int, window: int | None) -> torch.Tensor:
        t = x.shape[0]
        b = t // width
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        q, k, v = invariant_linear(x, weight, _bias(attn.q_proj, attn.k_proj, attn.v_proj)).split(
            [q_size, kv_size, kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if getattr(attn, "q_norm", None) is not None:
            q, k = rms_norm(q, attn.q_norm.weight, self.eps), rms_norm(k, attn.k_norm.weight, self.eps)
        q, k = apply_rotary(q, k, rope)
        pad = padded_key_len(width) - width

        def keys(z: torch.Tensor) -> torch.Tensor:  # [B * W, Hkv, D] -> [B, Hkv, L, D], zero keys past W
            z = z.view(b, width, self.num_kv_heads, self.head_dim)
            z = F.pad(z, (0, 0, 0, 0, 0, pad))
            return z.permute(2, 0, 1, 3).contiguous().transpose(0, 1)  # head-major, as the rollout gathers them

        o = invariant_attention(query_rows(q, self.num_kv_heads, width), keys(k), keys(v),
                                row_positions(positions, self.num_heads // self.num_kv_heads), lengths,
                                self.scale, window)
        return invariant_linear(output_rows(o, self.num_heads, width).reshape(t, q_size), attn.o_proj.weight,
                                attn.o_proj.bias)

    def _mlp(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        weight = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        gate, up = invariant_linear(x, weight, _bias(mlp.gate_proj, mlp.up_proj)).chunk(2, dim=-1)
        return invariant_linear(self.act(gate) * up, mlp.down_proj.weight, mlp.down_proj.bias)

    def token_logprobs(self, seqs: Sequence[Sequence[int]], starts: Sequence[int],
                       temperature: float = 1.0) -> list[torch.Tensor]:
        """Logprob of seqs[i][starts[i]:] (each token given the ones before it), as the server reports them
        for sampling at `temperature` (1: the model's distribution): a list of 1-D tensors with gradients."""
        width = max(len(s) for s in seqs)
        ids = torch.tensor([list(s) + [0] * (width - len(s)) for s in seqs])
        lengths = torch.tensor([len(s) for s in seqs])
        hidden = self.hidden_states(ids, lengths)
        rows = torch.cat([torch.arange(i * width + start - 1, i * width + len(s) - 1)
                          for i, (s, start) in enumerate(zip(seqs, starts))])
        logits = invariant_linear(hidden[rows], self.model.lm_head.weight).float()
        lp = processed_logprobs(logits, temperature)
        targets = torch.cat([torch.tensor(list(s[start:])) for s, start in zip(seqs, starts)])
        chosen = lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return list(chosen.split([len(s) - start for s, start in zip(seqs, starts)]))
