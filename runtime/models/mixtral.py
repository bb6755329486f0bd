"""Mixtral: the Mistral layout with a sparse MoE block in every layer (top-k renormalized, no shared expert).

Checkpoints name the block `block_sparse_moe` and an expert's projections w1 (gate), w3 (up), w2 (down);
transformers (v5) renames them to `mlp.gate` and fused `mlp.experts.*` in memory. Both resolve here.
"""

from transformers import PretrainedConfig

from runtime.models.moe import MoeSpec
from runtime.models.moe_decoder import MoeForCausalLM


class MixtralForCausalLM(MoeForCausalLM):
    checkpoint_block = "block_sparse_moe"
    expert_projections = {"w1": "gate", "w3": "up", "w2": "down"}

    @staticmethod
    def moe_spec(config: PretrainedConfig) -> MoeSpec:
        num_experts = getattr(config, "num_local_experts", None) or config.num_experts
        return MoeSpec(num_experts=num_experts, top_k=config.num_experts_per_tok,
                       expert_size=config.intermediate_size, renormalize=True, shared_expert_size=0,
                       router_first=True, fp32_weighting=True)
