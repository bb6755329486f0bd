"""Qwen3-MoE: Qwen3's attention (q/k norm) with sparse MoE blocks, no shared expert.

The top-k probabilities are renormalized only when the config's `norm_topk_prob` says so; layers listed in
`mlp_only_layers`, or off the `decoder_sparse_step` grid, keep a dense MLP of `intermediate_size`.
"""

from transformers import PretrainedConfig

from runtime.models.moe import MoeSpec
from runtime.models.moe_decoder import MoeForCausalLM


class Qwen3MoeForCausalLM(MoeForCausalLM):
    qk_norm = True

    @staticmethod
    def moe_spec(config: PretrainedConfig) -> MoeSpec:
        return MoeSpec(num_experts=config.num_experts, top_k=config.num_experts_per_tok,
                       expert_size=config.moe_intermediate_size, renormalize=bool(config.norm_topk_prob),
                       shared_expert_size=0, router_first=False, fp32_weighting=False)
