"""Routing replay for the trainer: make a transformers MoE model route tokens to given experts.

A rollout engine and a trainer compute a MoE router in different kernels and batch shapes, so near-tied
experts come out in a different order on some tokens, and the trainer's logprobs then belong to another
computation than the one that sampled the tokens. Replaying the rollout's expert choices fixes the
discrete part: inside `replay_routing(model, routed_experts)`, each MoE layer's router keeps its own
logits (the routing weights, and their gradients, come from the trainer's current router) but selects
the given experts instead of its own top-k:

    with replay_routing(model, routed_experts):   # [batch, seq, num MoE layers, top_k] expert ids
        logits = model(input_ids).logits

The ids follow the order of the model's input rows (batch-major, as the router sees them); padded
positions may hold any valid ids. It serves full forward passes (training, recomputing logprobs), not
`generate`. Supported routers: softmax then top-k, optionally renormalized (transformers v5's Qwen3-MoE,
Qwen2-MoE, Mixtral and OLMoE), whose forward returns (logits, top-k weights, top-k ids).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

SOFTMAX_TOPK_ROUTERS = ("Qwen3MoeTopKRouter", "Qwen2MoeTopKRouter", "MixtralTopKRouter", "OlmoeTopKRouter")
_ROUTER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:mlp|block_sparse_moe)\.gate$")


def moe_routers(model: nn.Module) -> dict[int, nn.Module]:
    """Each MoE layer's router module, by layer index (ascending); dense layers have none."""
    routers: dict[int, nn.Module] = {}
    for name, module in model.named_modules():
        m = _ROUTER_NAME.search(name)
        if m is None or not hasattr(module, "top_k"):
            continue
        if type(module).__name__ not in SOFTMAX_TOPK_ROUTERS:
            raise TypeError(f"Routing replay supports softmax top-k routers ({', '.join(SOFTMAX_TOPK_ROUTERS)}); "
                            f"{name} is a {type(module).__name__}.")
        routers[int(m[1])] = module
    return dict(sorted(routers.items()))


def _replaying_hook(layer: int, ids: torch.Tensor):
    def hook(module: nn.Module, args: tuple, output: tuple) -> tuple:
        logits, scores, natural = output
        if natural.shape != ids.shape:
            raise ValueError(f"Routing replay for layer {layer}: {tuple(ids.shape)} expert ids given, but the router "
                             f"sees {natural.shape[0]} tokens choosing {natural.shape[1]} experts each.")
        chosen = ids.to(natural.device)
        weights = torch.softmax(logits, dim=-1, dtype=torch.float32).gather(-1, chosen)
        if getattr(module, "norm_topk_prob", True):  # Mixtral always renormalizes (and has no such flag)
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(scores.dtype), chosen
    return hook


@contextmanager
def replay_routing(model: nn.Module, routed_experts: torch.Tensor) -> Iterator[None]:
    """Route every MoE layer of `model` by `routed_experts` ([..., num MoE layers, top_k] integer ids, the
    leading dims those of the input ids) while the context is open."""
    routers = moe_routers(model)
    if not routers:
        raise ValueError(f"{type(model).__name__} has no MoE router to replay.")
    if routed_experts.dim() < 3:
        raise ValueError(f"routed_experts must be [..., num MoE layers, top_k]; got shape {tuple(routed_experts.shape)}.")
    num_layers, top_k = routed_experts.shape[-2:]
    first = next(iter(routers.values()))
    if num_layers != len(routers) or top_k != first.top_k:
        raise ValueError(f"routed_experts has {num_layers} layers x top {top_k}; the model has {len(routers)} MoE "
                         f"layers ({list(routers)}) routing to top {first.top_k}.")
    num_experts = first.weight.shape[0]
    if routed_experts.numel() and (int(routed_experts.min()) < 0 or int(routed_experts.max()) >= num_experts):
        raise ValueError(f"routed_experts holds ids outside [0, {num_experts}).")
    flat = routed_experts.reshape(-1, num_layers, top_k).long()
    handles = [router.register_forward_hook(_replaying_hook(layer, flat[:, j]))
               for j, (layer, router) in enumerate(routers.items())]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
