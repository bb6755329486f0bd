"""The MoE decoder families' common model: the Llama-layout decoder with sparse MoE blocks as MLPs.

Qwen3-MoE, Qwen2-MoE and Mixtral subclass `MoeForCausalLM` with their config reading (`moe_spec`,
`sparse_layers`) and their checkpoint names. Parameters carry transformers' (v5) in-memory names
(`mlp.gate.weight`, `mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), so a trainer's
`named_parameters()` address them directly; the per-expert names published checkpoints use
(`mlp.experts.{e}.gate_proj.weight`, Mixtral's `block_sparse_moe.experts.{e}.w1.weight`) resolve to views
of one expert (`weight_target`), and `hf_weight_names` lists those, the names on disk.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import PretrainedConfig

from runtime.forward_batch import ForwardBatch
from runtime.models.layers import RMSNorm, RotaryTable
from runtime.models.llama import (DecoderLayer, DecoderMLP, DecoderModel, LlamaForCausalLM, ProjectionBias,
                                  sliding_window_of_layer)
from runtime.models.moe import MoeSpec, SparseMoeBlock

_EXPERT_NAME = re.compile(r"^model\.layers\.(\d+)\.(\w+)\.experts\.(\d+)\.(\w+)\.weight$")


class MoeDecoderLayer(DecoderLayer):
    """A decoder layer whose MLP is a sparse MoE block (or dense, where the config keeps the layer dense)."""

    def __init__(self, config: PretrainedConfig, layer_id: int, bias: ProjectionBias, qk_norm: bool,
                 spec: MoeSpec | None):
        mlp = SparseMoeBlock(config, spec, layer_id) if spec is not None else DecoderMLP(config)
        super().__init__(config, layer_id, bias, qk_norm, sliding_window_of_layer(config, layer_id), mlp)

    def run_mlp(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        if isinstance(self.mlp, SparseMoeBlock):
            return self.mlp(x, batch.routing)
        return self.mlp(x)


class MoeDecoderModel(DecoderModel):
    """DecoderModel's forward over MoE layers (dense where the config keeps a layer dense)."""

    def __init__(self, config: PretrainedConfig, bias: ProjectionBias, qk_norm: bool, max_positions: int,
                 spec: MoeSpec, sparse_layers: set[int]):
        nn.Module.__init__(self)  # DecoderModel's own __init__ builds dense layers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            MoeDecoderLayer(config, i, bias, qk_norm, spec if i in sparse_layers else None)
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryTable(config, self.layers[0].self_attn.head_dim, max_positions)


class MoeForCausalLM(LlamaForCausalLM):
    # Expert dispatch reads the tokens per expert on the host: a CUDA graph cannot capture that.
    supports_cuda_graph = False
    # Checkpoint names: the block's name on disk and each projection's name -> "gate" / "up" / "down".
    checkpoint_block = "mlp"
    expert_projections = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}

    @staticmethod
    def moe_spec(config: PretrainedConfig) -> MoeSpec:
        raise NotImplementedError

    @staticmethod
    def sparse_layers(config: PretrainedConfig) -> list[int]:
        """Indices of the layers whose MLP is a sparse MoE block (Qwen's decoder_sparse_step / mlp_only_layers)."""
        only_dense = set(getattr(config, "mlp_only_layers", None) or [])
        step = getattr(config, "decoder_sparse_step", 1) or 1
        return [i for i in range(config.num_hidden_layers) if i not in only_dense and (i + 1) % step == 0]

    def __init__(self, config: PretrainedConfig, max_positions: int | None = None):
        nn.Module.__init__(self)  # LlamaForCausalLM's __init__ builds a dense model
        self.config = config
        max_positions = max_positions or config.max_position_embeddings
        self.spec = self.moe_spec(config)
        self.routing_layers = self.sparse_layers(config) if self.spec.num_experts > 0 else []
        self.model = MoeDecoderModel(config, self.projection_bias(config), self.qk_norm, max_positions, self.spec,
                                     set(self.routing_layers))
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._params = dict(self.named_parameters(remove_duplicate=False))

    # --- weights by their HF names ---------------------------------------------------------------

    def _moe_block(self, layer: int) -> SparseMoeBlock | None:
        if layer >= len(self.model.layers):
            return None
        mlp = self.model.layers[layer].mlp
        return mlp if isinstance(mlp, SparseMoeBlock) else None

    def weight_target(self, hf_name: str) -> torch.Tensor | None:
        m = _EXPERT_NAME.match(hf_name)
        if m is not None:
            layer, block, expert, proj = int(m[1]), m[2], int(m[3]), m[4]
            moe = self._moe_block(layer)
            if (moe is None or block not in ("mlp", self.checkpoint_block) or expert >= moe.experts.num_experts
                    or proj not in self.expert_projections):
                raise KeyError(hf_name)
            return moe.experts.expert_view(expert, self.expert_projections[proj])
        if self.checkpoint_block != "mlp":
            hf_name = hf_name.replace(f".{self.checkpoint_block}.", ".mlp.")
        return super().weight_target(hf_name)

    def hf_names_of_param(self, name: str) -> list[str]:
        """Stacked experts list each expert's checkpoint names; the router its checkpoint name."""
        parts = name.split(".")
        if len(parts) > 4 and parts[3] == "mlp" and self._moe_block(int(parts[2])) is not None:
            base = ".".join(parts[:3] + [self.checkpoint_block])
            by_part = {part: proj for proj, part in self.expert_projections.items()}
            num_experts = self.spec.num_experts
            if parts[4:] == ["experts", "gate_up_proj"]:
                return [f"{base}.experts.{e}.{by_part[p]}.weight" for e in range(num_experts) for p in ("gate", "up")]
            if parts[4:] == ["experts", "down_proj"]:
                return [f"{base}.experts.{e}.{by_part['down']}.weight" for e in range(num_experts)]
            if parts[4:] == ["gate", "weight"]:
                return [f"{base}.gate.weight"]
        return super().hf_names_of_param(name)
