"""Qwen2-MoE: Qwen2's attention (q/k/v bias per `qkv_bias`) with sparse MoE blocks plus a shared expert.

Every MoE block adds a dense shared expert, scaled per token by sigmoid(shared_expert_gate(h)), to the
routed experts' sum. Dense layers follow `mlp_only_layers` / `decoder_sparse_step` as in Qwen3-MoE.
"""

from transformers import PretrainedConfig

from runtime.models.llama import ProjectionBias
from runtime.models.moe import MoeSpec
from runtime.models.moe_decoder import MoeForCausalLM


class Qwen2MoeForCausalLM(MoeForCausalLM):
    @staticmethod
    def projection_bias(config: PretrainedConfig) -> ProjectionBias:
        return ProjectionBias(qkv=bool(getattr(config, "qkv_bias", True)), o=False)

    @staticmethod
    def moe_spec(config: PretrainedConfig) -> MoeSpec:
        return MoeSpec(num_experts=config.num_experts, top_k=config.num_experts_per_tok,
                       expert_size=config.moe_intermediate_size, renormalize=bool(config.norm_topk_prob),
                       shared_expert_size=config.shared_expert_intermediate_size, router_first=True,
                       fp32_weighting=False)
