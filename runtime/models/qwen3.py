"""Qwen3: the Llama layout with RMSNorm on each head of q and k before rotary."""

from runtime.models.llama import LlamaForCausalLM
from runtime.models.registry import register_model


@register_model("Qwen3ForCausalLM")
class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
