"""Qwen3: the Llama layout with RMSNorm on each head of q and k before rotary."""

from runtime.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
