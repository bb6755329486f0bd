"""Mistral: the Llama layout; its optional sliding window is handled per layer by the attention mask."""

from runtime.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    pass
