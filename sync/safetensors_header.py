"""The safetensors layout read by hand: an 8-byte little-endian header length, a JSON header, then raw data.

Shared by the two readers that must not let safetensors' own code touch the bytes: checkpoint files (read
without memory-mapping, sync/checkpoint_file.py) and tensor payloads (sync/safetensors_payload.py). Both
hand out tensors that are views into one buffer, never per-tensor copies: a copy per tensor leaves
hundreds of megabytes of freed medium-sized blocks in the allocator's heap after every update, which the
process keeps (its resident memory creeps up under load), while one big buffer is returned to the system
whole when its last view goes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from safetensors.torch import _getdtype  # safetensors' own header-code -> torch dtype table

from sync.errors import WeightUpdateError

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets into the data section
    end: int


def header_length(head: bytes, size: int, not_ours: str, whole: str) -> int:
    """The JSON header's length, from the first 8 of the `size` bytes there are (`whole` names them: "the
    file", "the payload"); WeightUpdateError starting with `not_ours` when they cannot hold it."""
    if len(head) < 8:
        raise WeightUpdateError(f"{not_ours}: it has {size} bytes, fewer than the 8-byte header length.")
    n = int.from_bytes(head[:8], "little")
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise WeightUpdateError(f"{not_ours} (or is truncated): its header length field says {n} bytes, {whole} "
                                f"has {size}.")
    return n


def parse_header(raw: bytes, not_ours: str) -> dict:
    """The JSON header (an object); WeightUpdateError starting with `not_ours` when it is not one."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightUpdateError(f"{not_ours}: its header is not JSON ({e}).") from None
    if not isinstance(header, dict):
        raise WeightUpdateError(f"{not_ours}: its header is a JSON {type(header).__name__}, not an object.")
    return header


def header_entries(header: dict, source: str, data_bytes: int) -> list[TensorEntry]:
    """The tensors a parsed JSON header describes, in data order; `source` names the file or payload in errors."""
    entries = [tensor_entry(source, name, info, data_bytes) for name, info in header.items() if name != "__metadata__"]
    entries.sort(key=lambda e: e.begin)
    return entries


def tensor_entry(source: str, name: str, info: object, data_bytes: int) -> TensorEntry:
    where = f"Tensor {name!r} in {source}"
    if not isinstance(info, dict):
        raise WeightUpdateError(f"{where}: header entry is a {type(info).__name__}, not an object.")
    dtype_code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    try:
        dtype = _getdtype(dtype_code)
    except (KeyError, TypeError):
        raise WeightUpdateError(f"{where} has dtype {dtype_code!r}, which torch cannot read.") from None
    if not isinstance(shape, list) or any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
        raise WeightUpdateError(f"{where} has shape {shape!r}; expected a list of non-negative integers.")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or any(not isinstance(o, int) or isinstance(o, bool) for o in offsets)):
        raise WeightUpdateError(f"{where} has data_offsets {offsets!r}; expected [begin, end].")
    begin, end = offsets
    numel = 1
    for d in shape:
        numel *= d
    if not 0 <= begin <= end or end - begin != numel * dtype.itemsize:
        raise WeightUpdateError(f"{where}: data_offsets {offsets} do not hold {numel} elements of {dtype} "
                                f"({numel * dtype.itemsize} bytes).")
    if end > data_bytes:
        raise WeightUpdateError(f"{where}: data_offsets {offsets} run past the end of the data ({data_bytes} "
                                "bytes): it is truncated.")
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def entry_views(data: torch.Tensor, entries: list[TensorEntry], first: int = 0) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for each entry, a typed view into `data` (uint8, holding the data section from byte
    `first` on); an entry not aligned for its dtype is copied out instead."""
    out = []
    for e in entries:
        raw = data[e.begin - first:e.end - first]
        if (e.begin - first) % e.dtype.itemsize or raw.data_ptr() % e.dtype.itemsize:
            raw = raw.clone()
        out.append((e.name, raw.view(e.dtype).view(e.shape)))
    return out
