"""Reward models: Llama / Qwen2 ForSequenceClassification, a linear `score` head on the last token.

transformers pools the last non-pad token of a padded batch; the scheduler packs sequences without
padding, so the last token of each sequence is that token.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from runtime.models.decoder_head import DecoderWithHead
from runtime.models.qwen2 import Qwen2ForCausalLM
from runtime.models.registry import register_scoring_model


@register_scoring_model("LlamaForSequenceClassification")
class LlamaForSequenceClassification(DecoderWithHead):
    def build_head(self, config: PretrainedConfig) -> None:
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden).float()


@register_scoring_model("Qwen2ForSequenceClassification")
class Qwen2ForSequenceClassification(LlamaForSequenceClassification):
    family = Qwen2ForCausalLM
