"""Where an HF-named tensor goes in the model, and whether it fits there, checked without copying.

`model.weight_target(name)` gives the in-place tensor (a view into a fused qkv_proj / gate_up_proj if
need be), None for names the model skips (rotary caches, a tied lm_head), and KeyError for names it does
not know. Each check raises `WeightUpdateError` naming the tensor and what was expected and got.
"""

from __future__ import annotations

import bisect
from typing import Sequence

import torch

from sync.errors import WeightUpdateError
from sync.specs import TensorSpecs, parse_dtype


def resolve_target(model: torch.nn.Module, name: str, shape: Sequence[int],
                   dtype: torch.dtype) -> torch.Tensor | None:
    """The tensor `name` is copied into, or None when the model skips it; raises if it cannot go there."""
    try:
        target = model.weight_target(name)
    except KeyError:
        raise WeightUpdateError(f"Unknown weight {name}: the model has no parameter of that name.") from None
    if target is None:
        return None
    # copy_ would silently truncate an integer or complex tensor into a float weight: refuse it instead.
    if not dtype.is_floating_point:
        raise WeightUpdateError(f"Dtype mismatch for {name}: model expects a floating dtype castable to "
                                f"{target.dtype} {tuple(target.shape)}, got {dtype} {tuple(shape)}.")
    if tuple(shape) != tuple(target.shape):
        raise WeightUpdateError(f"Shape mismatch for {name}: model expects {tuple(target.shape)} "
                                f"{target.dtype}, got {tuple(shape)} {dtype}.")
    return target


def check_specs(model: torch.nn.Module, specs: TensorSpecs) -> list[torch.Tensor | None]:
    """Resolve every announced tensor before any data moves (e.g. before a broadcast starts)."""
    targets: list[torch.Tensor | None] = []
    seen: set[str] = set()
    for name, dtype, shape in zip(specs.names, specs.dtypes, specs.shapes):
        if name in seen:
            raise WeightUpdateError(f"Weight {name} appears twice in one update.")
        seen.add(name)
        try:
            torch_dtype = parse_dtype(dtype)
        except ValueError as e:
            raise WeightUpdateError(f"Dtype of {name}: {e}") from None
        targets.append(resolve_target(model, name, shape, torch_dtype))
    return targets


def _byte_range(t: torch.Tensor) -> tuple[int, int, int]:
    start = t.storage_offset() * t.element_size()
    return t.untyped_storage().data_ptr(), start, start + t.nbytes


def missing_weights(model: torch.nn.Module, names: Sequence[str]) -> list[str]:
    """The model's weights (`hf_weight_names`) that tensors named `names` would not write.

    Compared by the memory the names fill, not by name alone, so a checkpoint may name a fused tensor that
    holds several of the model's weights: a transformers (v5) state dict's stacked `mlp.experts.gate_up_proj`
    covers each expert's `experts.{e}.gate_proj.weight` and `up_proj.weight`.
    """
    given = set(names)
    spans: dict[int, list[tuple[int, int]]] = {}  # storage -> byte ranges the given names write
    for name in given:
        try:
            target = model.weight_target(name)
        except KeyError:
            continue
        if target is not None and target.is_contiguous():
            storage, start, end = _byte_range(target)
            spans.setdefault(storage, []).append((start, end))
    merged: dict[int, tuple[list[int], list[int]]] = {}  # storage -> (starts, ends) of disjoint sorted ranges
    for storage, ranges in spans.items():
        starts, ends = [], []
        for a, b in sorted(ranges):
            if starts and a <= ends[-1]:
                ends[-1] = max(ends[-1], b)
            else:
                starts.append(a)
                ends.append(b)
        merged[storage] = (starts, ends)
    missing = []
    for name in model.hf_weight_names():
        target = None if name in given else model.weight_target(name)
        if target is None:
            continue
        storage, start, end = _byte_range(target)
        starts, ends = merged.get(storage, ([], []))
        i = bisect.bisect_right(starts, start) - 1
        if not (target.is_contiguous() and i >= 0 and end <= ends[i]):
            missing.append(name)
    return missing
