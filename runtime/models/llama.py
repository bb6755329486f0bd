"""The Llama decoder family (SmolLM2 is one). Qwen2, Qwen3 and Mistral subclass it with their flags.

Parameters keep transformers' names except where projections are fused for speed: q/k/v into
`qkv_proj` and gate/up into `gate_up_proj`. `load_weight` takes HF names and copies in place into
the right slice, so the same path serves model load and hot weight updates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from kernels.rotary import RotaryInputs, apply_rotary
from runtime.attention.base import AttentionBackend
from runtime.forward_batch import ForwardBatch
from runtime.models.activations import activation
from runtime.models.layers import RMSNorm, RotaryTable
from runtime.weight_loader import copy_into_target

# (fused parameter, HF projection name, shard)
STACKED_PARAMS = [
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
]


@dataclass(frozen=True)
class ProjectionBias:
    qkv: bool
    o: bool


class DecoderAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_id: int, bias: "ProjectionBias", qk_norm: bool,
                 sliding_window: int | None):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.sliding_window = sliding_window
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=bias.qkv)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=bias.o)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None

    def shard_rows(self, shard: str) -> slice:
        return {"q": slice(0, self.q_size), "k": slice(self.q_size, self.q_size + self.kv_size),
                "v": slice(self.q_size + self.kv_size, self.q_size + 2 * self.kv_size)}[shard]

    def forward(self, h: torch.Tensor, rope: RotaryInputs, batch: ForwardBatch,
                backend: AttentionBackend) -> torch.Tensor:
        t = h.shape[0]
        q, k, v = self.qkv_proj(h).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, k, rope)
        o = backend.forward(q, k, v, self.layer_id, batch, self.scale, self.sliding_window)
        return self.o_proj(o.reshape(t, self.q_size))


class DecoderMLP(nn.Module):
    def __init__(self, config: PretrainedConfig, intermediate_size: int | None = None):
        super().__init__()
        # MoE families size their dense layers and shared expert apart from config.intermediate_size.
        self.intermediate_size = intermediate_size or config.intermediate_size
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * self.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(self.intermediate_size, config.hidden_size, bias=bias)
        self.act = activation(config.hidden_act)

    def shard_rows(self, shard: int) -> slice:
        return slice(shard * self.intermediate_size, (shard + 1) * self.intermediate_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(h).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_id: int, bias: "ProjectionBias", qk_norm: bool,
                 sliding_window: int | None, mlp: nn.Module | None = None):
        super().__init__()
        self.self_attn = DecoderAttention(config, layer_id, bias, qk_norm, sliding_window)
        self.mlp = mlp if mlp is not None else DecoderMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def run_mlp(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """The MLP on the normed stream; MoE layers override it to record their routing in the batch."""
        return self.mlp(x)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, rope: RotaryInputs, batch: ForwardBatch,
                backend: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it); the next layer (or the final norm)
        adds the two, fused with its norm. residual None: h is the embedding, the stream's start."""
        if residual is None:
            residual, x = h, self.input_layernorm(h)
        else:
            x, residual = self.input_layernorm.add_and_norm(h, residual)
        x = self.self_attn(x, rope, batch, backend)
        x, residual = self.post_attention_layernorm.add_and_norm(x, residual)
        return self.run_mlp(x, batch), residual


class DecoderModel(nn.Module):
    def __init__(self, config: PretrainedConfig, bias: "ProjectionBias", qk_norm: bool, max_positions: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, bias, qk_norm, sliding_window_of_layer(config, i))
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        head_dim = self.layers[0].self_attn.head_dim
        self.rotary = RotaryTable(config, head_dim, max_positions)

    def forward(self, batch: ForwardBatch, backend: AttentionBackend) -> torch.Tensor:
        h = self.embed_tokens(batch.input_ids)
        rope = self.rotary(batch.positions, h.dtype)
        residual = None
        for layer in self.layers:
            h, residual = layer(h, residual, rope, batch, backend)
        return self.norm(h) if residual is None else self.norm.add_and_norm(h, residual)[0]


def sliding_window_of_layer(config: PretrainedConfig, layer_id: int) -> int | None:
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return config.sliding_window if layer_types[layer_id] == "sliding_attention" else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return getattr(config, "sliding_window", None)


class LlamaForCausalLM(nn.Module):
    qk_norm = False

    @staticmethod
    def projection_bias(config: PretrainedConfig) -> ProjectionBias:
        attention_bias = bool(getattr(config, "attention_bias", False))
        return ProjectionBias(qkv=attention_bias, o=attention_bias)

    def __init__(self, config: PretrainedConfig, max_positions: int | None = None):
        super().__init__()
        self.config = config
        max_positions = max_positions or config.max_position_embeddings
        self.model = DecoderModel(config, self.projection_bias(config), self.qk_norm, max_positions)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._params = dict(self.named_parameters(remove_duplicate=False))

    def forward(self, batch: ForwardBatch, backend: AttentionBackend) -> torch.Tensor:
        return self.model(batch, backend)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    # --- weights by their HF names ---------------------------------------------------------------

    def weight_target(self, hf_name: str) -> torch.Tensor | None:
        """The tensor (a view into a fused parameter if need be) that the HF weight `hf_name` lives in.

        None for checkpoint entries the model has no use for (rotary caches, a tied lm_head).
        Raises KeyError for a name the model does not know.
        """
        if "rotary_emb.inv_freq" in hf_name:
            return None
        if hf_name == "lm_head.weight" and self.tie_word_embeddings:
            return None
        for fused, part, shard in STACKED_PARAMS:
            if f".{part}." in hf_name:
                name = hf_name.replace(f".{part}.", f".{fused}.")
                param = self._params.get(name)
                if param is None:
                    raise KeyError(hf_name)
                owner = self.get_submodule(name.rsplit(".", 2)[0])
                return param.data[owner.shard_rows(shard)]
        if hf_name not in self._params:
            raise KeyError(hf_name)
        return self._params[hf_name].data

    def load_weight(self, hf_name: str, tensor: torch.Tensor) -> None:
        copy_into_target(self.weight_target(hf_name), hf_name, tensor)

    def hf_weight_names(self) -> list[str]:
        """Every HF name this model loads, in parameter order."""
        return [hf for name in self._params for hf in self.hf_names_of_param(name)]

    def hf_names_of_param(self, name: str) -> list[str]:
        """The HF names whose tensors make up our parameter `name` (several for a fused one)."""
        if name == "lm_head.weight" and self.tie_word_embeddings:
            return []
        fused = [part for f, part, _ in STACKED_PARAMS if f".{f}." in name]
        if fused:
            f = next(f for f, _, _ in STACKED_PARAMS if f".{f}." in name)
            return [name.replace(f".{f}.", f".{part}.") for part in fused]
        return [name]
