"""Where a broadcast can land straight in the model: the byte range a bucket (or one tensor) fills.

A bucket maps when its tensors' targets are contiguous views of one storage, with exactly the announced
dtypes, sitting back to back in the bucket's order with the bucket's own offsets (so no padding of a
mixed bucket lands on bytes that belong to something else). Then the bucket's buffer IS that byte range
(sync.flat_parameters lays the parameters out so that HF-ordered buckets do). Anything else (a skipped
name such as a tied lm_head, a dtype to convert, a fused bias in another order) gives None: receive into
a buffer and copy.
"""

from __future__ import annotations

from typing import Sequence

import torch

from sync.bucket import BucketMeta
from sync.specs import nbytes_of, parse_dtype


def _byte_offset(t: torch.Tensor) -> int:
    return t.storage_offset() * t.element_size()


def _same_device(a: torch.device, b: torch.device) -> bool:
    # "cuda" (the current device) and "cuda:0" name the same memory when the index is left open.
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def tensor_view(target: torch.Tensor | None, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor | None:
    """`target` itself when the broadcast can be received into it (contiguous, same dtype and device)."""
    if target is None or target.dtype != dtype or not target.is_contiguous():
        return None
    if not _same_device(target.device, torch.device(device)) or target.untyped_storage().nbytes() == 0:
        return None
    return target


def bucket_view(targets: Sequence[torch.Tensor | None], meta: BucketMeta,
                device: torch.device | str) -> torch.Tensor | None:
    """A uint8 view of the model's bytes that the bucket's flat buffer equals, or None if there is none."""
    if not targets or any(t is None for t in targets):
        return None
    first = targets[0]
    storage = first.untyped_storage()
    itemsize = parse_dtype(meta.buffer_dtype).itemsize
    start = _byte_offset(first)
    expected = 0  # bytes of the bucket laid down so far: the next tensor must start exactly there
    for t, dtype, shape, offset in zip(targets, meta.dtypes, meta.shapes, meta.offsets):
        if tensor_view(t, parse_dtype(dtype), device) is None or t.untyped_storage().data_ptr() != storage.data_ptr():
            return None
        if offset * itemsize != expected or _byte_offset(t) != start + expected:
            return None
        expected += nbytes_of(shape, t.dtype)
    if expected != meta.buffer_nbytes() or start + expected > storage.nbytes():
        return None
    flat = first.reshape(-1).view(torch.uint8)
    return flat.as_strided((expected,), (1,), start)
