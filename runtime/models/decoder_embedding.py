"""Decoder embedding models (gte-Qwen2, Qwen3-Embedding style): the last token's final hidden state,
L2-normalised. Served from a CausalLM checkpoint (its LM head is skipped) or a bare `*Model` one, whose
tensor names lack the `model.` prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from runtime.models.decoder_head import DecoderWithHead
from runtime.models.llama import LlamaForCausalLM
from runtime.models.mistral import MistralForCausalLM
from runtime.models.qwen2 import Qwen2ForCausalLM
from runtime.models.qwen3 import Qwen3ForCausalLM

PREFIX = "model."


class DecoderEmbeddingModel(DecoderWithHead):
    def __init__(self, config: PretrainedConfig, max_positions: int | None = None):
        super().__init__(config, max_positions)
        archs = list(getattr(config, "architectures", None) or [])
        # A bare `LlamaModel` checkpoint names its tensors `layers.0...`, not `model.layers.0...`.
        self.bare_names = bool(archs) and archs[0].endswith("Model")

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.normalize(hidden.float(), p=2.0, dim=-1)

    def weight_target(self, hf_name: str) -> torch.Tensor | None:
        if hf_name == "lm_head.weight":  # a CausalLM checkpoint's head: not used for pooling
            return None
        if self.bare_names:
            hf_name = PREFIX + hf_name
        return super().weight_target(hf_name)

    def hf_weight_names(self) -> list[str]:
        names = super().hf_weight_names()
        return [n[len(PREFIX):] for n in names] if self.bare_names else names


class LlamaEmbeddingModel(DecoderEmbeddingModel):
    family = LlamaForCausalLM


class Qwen2EmbeddingModel(DecoderEmbeddingModel):
    family = Qwen2ForCausalLM


class Qwen3EmbeddingModel(DecoderEmbeddingModel):
    family = Qwen3ForCausalLM


class MistralEmbeddingModel(DecoderEmbeddingModel):
    family = MistralForCausalLM
