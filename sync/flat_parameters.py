"""One flat storage per (dtype, device) holding every parameter, laid out in the checkpoint's name order.

A trainer broadcasts its weights in HF `state_dict` order (embed_tokens, then per layer q, k, v, o, gate,
up, down, the two norms, ..., norm, lm_head). Our fused `qkv_proj` rows are [q; k; v] and `gate_up_proj`
rows [gate; up], so when the parameters sit back to back in that order, a bucket of consecutive HF tensors
is byte for byte one range of the flat storage and can be received into it directly (no buffer, no copy:
see sync.direct_target). Names whose targets do not line up (Qwen2's q/k/v biases, which HF interleaves
with the weights while ours form one fused bias) only make the buckets holding them take the buffered path.

Parameters are rebound to views (`param.data = view`), so modules, tied weights (one Parameter shared by
embed_tokens and lm_head) and `weight_target` views keep working unchanged.

The trainer side uses it too: a trainer's HF model flattened once (before its optimizer is built) has
its `named_parameters()` back to back in the same order, so WeightSender sends every bucket as a view
of the parameters, with no copy (`sync.flatten_parameters(model)`).
"""

from __future__ import annotations

import torch
from torch import nn

ALIGN = 16  # bytes; every param starts aligned (vector loads stay legal); sizes are nearly always multiples


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _params_in_hf_order(model: nn.Module) -> list[nn.Parameter]:
    """Distinct parameters in the order their HF names first appear; any the names never reach go last."""
    by_storage = {}
    for p in model.parameters():  # deduplicated: a tied weight once
        # Keyed by where the values sit, so two Parameters viewing one tensor (tied) count once.
        by_storage.setdefault((p.untyped_storage().data_ptr(), p.storage_offset()), p)
    ordered: dict[int, nn.Parameter] = {}
    names = model.hf_weight_names() if hasattr(model, "hf_weight_names") else []
    for name in names:
        target = model.weight_target(name)
        if target is None:
            continue
        p = by_storage.get((target.untyped_storage().data_ptr(), target.storage_offset()))
        if p is not None:
            ordered.setdefault(id(p), p)
    for p in by_storage.values():
        ordered.setdefault(id(p), p)
    return list(ordered.values())


def flatten_parameters(model: nn.Module) -> list[torch.Tensor]:
    """Move every parameter into one flat uint8 storage per (dtype, device); values are unchanged.

    Returns the flat byte tensors. Run once after load, before anything captures parameter pointers.
    Peak memory during the move is about twice the parameters (the old ones are freed as they are moved).
    """
    groups: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
    for p in _params_in_hf_order(model):
        groups.setdefault((p.dtype, p.device), []).append(p)
    flats = []
    with torch.no_grad():
        for (dtype, device), params in groups.items():
            offsets, end = [], 0
            for p in params:
                end = _align(end)  # a gap only after a param of odd size: buckets over it are buffered
                offsets.append(end)
                end += p.nbytes
            flat = torch.empty(end, dtype=torch.uint8, device=device)
            for p, off in zip(params, offsets):
                view = flat[off:off + p.nbytes].view(dtype).view(p.shape)
                view.copy_(p.data)
                p.data = view
            flats.append(flat)
    return flats
