"""Mistral: the Llama layout; its optional sliding window is handled per layer by the attention mask."""

from runtime.models.llama import LlamaForCausalLM
from runtime.models.registry import register_model


@register_model("MistralForCausalLM")
class MistralForCausalLM(LlamaForCausalLM):
    pass
