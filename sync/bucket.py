"""Many tensors in one flat buffer, plus the metadata to slice them out again.

A bucket whose tensors share a dtype is a flat tensor of that dtype with the tensors packed back to back
(offsets in elements): the layout SGLang's `flattened_bucket` load format uses, so a request carrying
only `names, dtypes, shapes` is enough for the receiver to rebuild it (`layout_bucket`). A bucket of mixed
dtypes is a uint8 byte buffer (offsets in bytes, each aligned to `ALIGN` so every slice can be viewed as
its dtype); only our own sender and receiver speak that one.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from sync.scratch import ScratchBuffer
from sync.specs import TensorSpecs, dtype_name, nbytes_of, parse_dtype

ALIGN = 16  # bytes; the largest element size (complex128), so any dtype view of a slice is legal


class BucketMeta(TensorSpecs):
    buffer_dtype: str   # dtype of the flat buffer: the tensors' own, or "uint8" when they differ
    offsets: list[int]  # where each tensor starts, in buffer elements (bytes for a uint8 buffer)
    numel: int          # buffer length in elements

    def buffer_nbytes(self) -> int:
        return self.numel * parse_dtype(self.buffer_dtype).itemsize

    def specs(self) -> TensorSpecs:
        """The fields a `/update_weights_from_distributed` request carries for this bucket."""
        return TensorSpecs(list(self.names), list(self.dtypes), [list(s) for s in self.shapes])


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def layout_bucket(specs: TensorSpecs) -> BucketMeta:
    """The one layout both ends derive from the same names, dtypes and shapes."""
    if not len(specs):
        raise ValueError("A bucket needs at least one tensor.")
    dtypes = specs.torch_dtypes()
    offsets, end = [], 0
    if len(set(dtypes)) == 1:
        buffer_dtype = dtypes[0]
        for shape in specs.shapes:
            offsets.append(end)
            end += nbytes_of(shape, buffer_dtype) // buffer_dtype.itemsize
    else:
        buffer_dtype = torch.uint8
        for shape, dtype in zip(specs.shapes, dtypes):
            end = _align(end)
            offsets.append(end)
            end += nbytes_of(shape, dtype)
    return BucketMeta(names=list(specs.names), dtypes=[dtype_name(d) for d in dtypes],
                      shapes=[list(s) for s in specs.shapes], buffer_dtype=dtype_name(buffer_dtype),
                      offsets=offsets, numel=end)


def _slice(flat: torch.Tensor, meta: BucketMeta, i: int) -> torch.Tensor:
    dtype = parse_dtype(meta.dtypes[i])
    shape = meta.shapes[i]
    if flat.dtype == dtype:
        numel = nbytes_of(shape, dtype) // dtype.itemsize
        return flat[meta.offsets[i]:meta.offsets[i] + numel].view(shape)
    nbytes = nbytes_of(shape, dtype)
    return flat[meta.offsets[i]:meta.offsets[i] + nbytes].view(dtype).view(shape)


def flatten_bucket(named: Sequence[tuple[str, torch.Tensor]],
                   scratch: ScratchBuffer | None = None) -> tuple[torch.Tensor, BucketMeta]:
    """One flat buffer (on the first tensor's device) holding copies of all the tensors, and its layout.

    A bucket of one contiguous tensor is that tensor's own memory, viewed flat (no copy). With `scratch`
    the buffer is a view into it (valid until its next use), so a push of many buckets faults in new
    pages once instead of for every bucket.
    """
    meta = layout_bucket(TensorSpecs.of(named))
    first = named[0][1]
    if len(named) == 1 and first.is_contiguous():
        return first.detach().reshape(-1), meta
    dtype = parse_dtype(meta.buffer_dtype)
    if scratch is not None:
        flat = scratch.take(meta.buffer_nbytes(), first.device).view(dtype)
    else:
        flat = torch.empty(meta.numel, dtype=dtype, device=first.device)
    with torch.no_grad():
        for i, (_, tensor) in enumerate(named):
            _slice(flat, meta, i).copy_(tensor)
    return flat, meta


def unflatten_bucket(flat: torch.Tensor, meta: BucketMeta) -> list[tuple[str, torch.Tensor]]:
    """(name, view into `flat`) for every tensor of the bucket; no copies."""
    if flat.dtype != parse_dtype(meta.buffer_dtype) or flat.dim() != 1 or flat.numel() != meta.numel:
        raise ValueError(f"Bucket buffer is {flat.dtype} {tuple(flat.shape)}, metadata says "
                         f"{meta.buffer_dtype} ({meta.numel},).")
    return [(name, _slice(flat, meta, i)) for i, name in enumerate(meta.names)]


def plan_buckets(specs: Iterable[tuple[str, Sequence[int], torch.dtype | str]], bucket_bytes: int, *,
                 split_on_dtype: bool = True) -> list[BucketMeta]:
    """Split (name, shape, dtype) triples, in order, into buckets of at most `bucket_bytes` each.

    A tensor larger than the limit gets a bucket of its own. split_on_dtype (default) starts a new bucket
    at each dtype change so every bucket is a typed, SGLang-compatible buffer.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}.")
    buckets: list[BucketMeta] = []
    current: list[tuple[str, list[int], torch.dtype]] = []
    used = 0

    def close() -> None:
        nonlocal current, used
        if current:
            buckets.append(layout_bucket(TensorSpecs([n for n, _, _ in current],
                                                     [dtype_name(d) for _, _, d in current],
                                                     [s for _, s, _ in current])))
        current, used = [], 0

    for name, shape, dtype in specs:
        dtype = parse_dtype(dtype)
        nbytes = nbytes_of(shape, dtype)
        if current and split_on_dtype and dtype != current[-1][2]:
            close()
        # Counting padding as if the bucket were mixed over-estimates a uniform one: still within limit.
        start = used if split_on_dtype else _align(used)
        if current and start + nbytes > bucket_bytes:
            close()
            start = 0
        current.append((name, [int(d) for d in shape], dtype))
        used = start + nbytes
    close()
    return buckets
