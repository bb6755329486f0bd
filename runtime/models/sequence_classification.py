"""Reward models: Llama / Qwen2 ForSequenceClassification, a linear `score` head on the last token.

transformers pools the last token that is not `pad_token_id` (so a chat ending in an end-of-turn token
that doubles as the pad token, as SmolLM2's <|im_end|>, is scored on the token before it). The front end
drops such trailing tokens before scheduling (runtime/scoring_input.py): the model is causal, so the
hidden state of the last kept token is the same with or without them, and the head reads the last token.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from runtime.models.decoder_head import DecoderWithHead
from runtime.models.qwen2 import Qwen2ForCausalLM


class LlamaForSequenceClassification(DecoderWithHead):
    pools_last_non_pad = True

    def build_head(self, config: PretrainedConfig) -> None:
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden).float()


class Qwen2ForSequenceClassification(LlamaForSequenceClassification):
    family = Qwen2ForCausalLM
