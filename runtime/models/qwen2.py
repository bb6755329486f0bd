"""Qwen2: the Llama layout with a bias on the q/k/v projections (never on o_proj)."""

from transformers import PretrainedConfig

from runtime.models.llama import LlamaForCausalLM, ProjectionBias


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def projection_bias(config: PretrainedConfig) -> ProjectionBias:
        return ProjectionBias(qkv=True, o=False)
