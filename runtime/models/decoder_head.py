"""A decoder family's backbone with a scoring head in place of the LM head.

It subclasses the family's CausalLM class only to reuse its HF weight naming (`weight_target`,
`load_weight`, `hf_weight_names`, fused q/k/v and gate/up), so model load and hot weight updates (sync/)
treat scoring models exactly like generation models. It never allocates the vocabulary-sized LM head.
The runner calls `compute_logits(hidden)` on the last token of each sequence; here that is the head.
"""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from runtime.models.llama import DecoderModel, LlamaForCausalLM


class DecoderWithHead(LlamaForCausalLM):
    family: type[LlamaForCausalLM] = LlamaForCausalLM   # whose projection biases and q/k norm to build
    bidirectional = False        # runs the causal, paged, chunked prefill path of the scheduler
    is_cross_encoder = False     # scores single texts, not (query, document) pairs

    def __init__(self, config: PretrainedConfig, max_positions: int | None = None):
        nn.Module.__init__(self)  # not the CausalLM __init__: no LM head
        self.config = config
        max_positions = max_positions or config.max_position_embeddings
        self.model = DecoderModel(config, self.family.projection_bias(config), self.family.qk_norm, max_positions)
        self.tie_word_embeddings = False
        self.build_head(config)
        self._params = dict(self.named_parameters(remove_duplicate=False))

    def build_head(self, config: PretrainedConfig) -> None:
        """Create the head's parameters (named as in transformers); subclasses also define compute_logits."""
