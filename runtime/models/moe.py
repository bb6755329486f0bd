"""A sparse mixture-of-experts MLP block: top-k router, experts stacked in two 3-D weights, optional shared expert.

Expert weights are stored as transformers (v5) keeps them in memory: `experts.gate_up_proj` [E, 2I, H]
(each expert's gate rows, then its up rows) and `experts.down_proj` [E, H, I]. Every checkpoint name of one
expert (`experts.{e}.gate_proj.weight`, Mixtral's `w1`/`w3`/`w2`) is a contiguous view into them
(`expert_view`), so load and hot updates copy in place, and a trainer's fused tensors map one to one.

The experts run grouped: the (token, slot) pairs are sorted by expert id, each expert multiplies its
contiguous rows in one matmul, and the weighted results are summed back per token, in ascending expert
order per token as transformers does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from runtime.models.activations import activation
from runtime.models.llama import DecoderMLP
from runtime.routing_capture import RoutingCapture


@dataclass(frozen=True)
class MoeSpec:
    num_experts: int
    top_k: int
    expert_size: int          # intermediate size of each expert
    renormalize: bool         # divide the top-k probabilities by their sum (norm_topk_prob)
    shared_expert_size: int   # 0: no shared expert
    router_first: bool        # the router's parameter comes before the experts' (transformers' order)
    fp32_weighting: bool      # scale expert outputs by the fp32 routing weights (Mixtral) or cast them first


class TopKRouter(nn.Module):
    # The matrix product (deterministic mode swaps in a batch-invariant one: runtime/deterministic.py).
    linear = staticmethod(F.linear)

    def __init__(self, hidden_size: int, spec: MoeSpec):
        super().__init__()
        self.top_k = spec.top_k
        self.renormalize = spec.renormalize
        self.weight = nn.Parameter(torch.empty(spec.num_experts, hidden_size))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([T, k] expert ids, [T, k] fp32 routing weights)."""
        probs = torch.softmax(self.linear(h, self.weight), dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights


class StackedExperts(nn.Module):
    linear = staticmethod(F.linear)  # as TopKRouter's

    def __init__(self, hidden_size: int, spec: MoeSpec, hidden_act: str):
        super().__init__()
        self.num_experts = spec.num_experts
        self.expert_size = spec.expert_size
        self.fp32_weighting = spec.fp32_weighting
        self.gate_up_proj = nn.Parameter(torch.empty(spec.num_experts, 2 * spec.expert_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(spec.num_experts, hidden_size, spec.expert_size))
        self.act = activation(hidden_act)

    def expert_view(self, expert: int, part: str) -> torch.Tensor:
        """One expert's "gate", "up" or "down" projection as a view of the stacked weights."""
        i = self.expert_size
        if part == "gate":
            return self.gate_up_proj.data[expert, :i]
        if part == "up":
            return self.gate_up_proj.data[expert, i:]
        if part == "down":
            return self.down_proj.data[expert]
        raise KeyError(part)

    def forward(self, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        k = ids.shape[1]
        flat_ids = ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)  # (token, slot) pairs grouped by expert, tokens ascending
        token_of_row = order // k
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        rows = h.index_select(0, token_of_row)
        out = torch.empty_like(rows)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            gate, up = self.linear(rows[start:start + n], self.gate_up_proj[e]).chunk(2, dim=-1)
            out[start:start + n] = self.linear(self.act(gate) * up, self.down_proj[e])
            start += n
        row_weights = weights.reshape(-1)[order, None]
        if self.fp32_weighting:
            out = (out.float() * row_weights).to(h.dtype)
        else:
            out = out * row_weights.to(h.dtype)
        return torch.zeros_like(h).index_add_(0, token_of_row, out)


class SparseMoeBlock(nn.Module):
    def __init__(self, config: PretrainedConfig, spec: MoeSpec, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        # Registration order is parameter order, which the flat layout follows (sync.flat_parameters):
        # keep transformers' own so a trainer's buckets land directly.
        if spec.router_first:
            self.gate = TopKRouter(config.hidden_size, spec)
        self.experts = StackedExperts(config.hidden_size, spec, config.hidden_act)
        if not spec.router_first:
            self.gate = TopKRouter(config.hidden_size, spec)
        self.shared_expert = None
        self.shared_expert_gate = None
        if spec.shared_expert_size:
            self.shared_expert = DecoderMLP(config, spec.shared_expert_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, h: torch.Tensor, routing: RoutingCapture | None) -> torch.Tensor:
        ids, weights = self.gate(h)
        if routing is not None:
            routing.record(self.layer_id, ids)
        out = self.experts(h, ids, weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(h)) * self.shared_expert(h)
        return out
