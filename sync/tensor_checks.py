"""Checks on the values of an update, before they are copied into the weights (or, for a broadcast received
straight into them, right after): every float is finite, and each tensor matches the trainer's digest.

A NaN or Inf weight makes the model emit '' or token 0 forever, so it is refused like a wrong shape. The
digest is sync.checksum's CRC-32 of the tensor's bytes as sent (the trainer's dtype), keyed by HF name.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from sync.checksum import tensor_checksum
from sync.errors import WeightUpdateError


def non_finite_error(name: str, tensor: torch.Tensor, where: str = "") -> str | None:
    """None when every value of a floating tensor is finite, else a message naming the tensor."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    # A sum is NaN or Inf whenever any element is, and one reduction pass costs a tenth of isfinite().all()
    # (which writes a bool per element); only a non-finite sum (or an overflow) needs the exact check.
    if bool(torch.isfinite(tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32))):
        return None
    if bool(torch.isfinite(tensor).all()):
        return None
    flat = tensor.detach().reshape(-1)
    nans = int(torch.isnan(flat).sum())
    infs = int(torch.isinf(flat).sum())
    return (f"Weight {name}{where} holds non-finite values ({nans} NaN, {infs} Inf of {flat.numel()} "
            "elements)")


def check_finite(named: Iterable[tuple[str, torch.Tensor]], where: str = "") -> None:
    """Raise WeightUpdateError for the first tensor holding a NaN or an Inf."""
    for name, tensor in named:
        error = non_finite_error(name, tensor, where)
        if error is not None:
            raise WeightUpdateError(error)


def digest_error(name: str, tensor: torch.Tensor, digests: Mapping[str, int], where: str = "") -> str | None:
    want = digests.get(name)
    if want is None:
        return None
    got = tensor_checksum(tensor)
    if got == want:
        return None
    return (f"Weight {name}{where} does not match its digest: CRC-32 of the received {tensor.dtype} bytes is "
            f"{got:#010x}, digests[{name!r}] is {want:#010x}")


def check_digests(named: Iterable[tuple[str, torch.Tensor]], digests: Mapping[str, int] | None,
                  where: str = "") -> None:
    """Raise WeightUpdateError for the first tensor whose bytes do not match its digest; digests naming a
    tensor the update does not carry are an error too (the trainer expected it to be applied)."""
    if not digests:
        return
    seen = set()
    for name, tensor in named:
        seen.add(name)
        error = digest_error(name, tensor, digests, where)
        if error is not None:
            raise WeightUpdateError(error)
    extra = sorted(set(digests) - seen)
    if extra:
        raise WeightUpdateError(f"digests name {len(extra)} tensors this update does not carry, e.g. {extra[:3]}")


def check_values(named: list[tuple[str, torch.Tensor]], digests: Mapping[str, int] | None, where: str = "") -> None:
    check_finite(named, where)
    check_digests(named, digests, where)
