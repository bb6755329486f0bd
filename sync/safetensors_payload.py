"""The `update_weights_from_tensor` payload: named tensors as safetensors bytes, base64 for JSON.

Never pickle: safetensors is a JSON header plus raw bytes, so decoding a payload cannot run code. The
tensor order is kept in the header's metadata (safetensors itself stores tensors sorted).
"""

from __future__ import annotations

import base64
import binascii
import json
import warnings
from typing import Iterable

import torch
from safetensors.torch import save

from sync.errors import WeightUpdateError
from sync.safetensors_header import entry_views, header_entries, header_length, parse_header

_ORDER_KEY = "names"


def encode_named_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Base64 text of a safetensors file holding the tensors (copied to the CPU), order kept."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in named:
        if name in tensors:
            raise ValueError(f"Tensor {name} appears twice.")
        t = tensor.detach().to("cpu").contiguous()
        # safetensors refuses tensors sharing memory (tied weights, views of one buffer): give it copies.
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages and t.numel():
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    return base64.b64encode(save(tensors, metadata={_ORDER_KEY: json.dumps(list(tensors))})).decode("ascii")


def decode_named_tensors(payload: str | bytes | memoryview) -> list[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) in the order they were encoded; raises WeightUpdateError on anything else.

    The tensors are read-only views into the decoded bytes (one buffer, freed whole with the last of them)."""
    try:
        # binascii reads str (ASCII) and buffers in place; base64.b64decode would copy either first.
        raw = binascii.a2b_base64(payload, strict_mode=True)
    except (binascii.Error, ValueError, TypeError) as e:
        raise WeightUpdateError(f"Tensor payload is not valid base64: {e}") from None
    # A pickle (protocol 2+) starts with 0x80; so does a safetensors payload whose JSON header is 128 bytes
    # long (its 8-byte length, then "{"). Either way nothing here runs code: the bytes are only parsed.
    if raw[:1] == b"\x80" and raw[8:9] != b"{":
        raise WeightUpdateError("Tensor payload is a pickle; only safetensors bytes are accepted.")
    header, data_start = _header(raw)
    entries = header_entries(header, "the tensor payload", len(raw) - data_start)
    try:
        order = _names(header) or [e.name for e in entries]
    except (ValueError, TypeError, AttributeError) as e:
        raise WeightUpdateError(f"Tensor payload's metadata {_ORDER_KEY!r} is not a JSON list of tensor names: "
                                f"{e}") from None
    if not isinstance(order, list) or any(not isinstance(n, str) for n in order):
        raise WeightUpdateError(f"Tensor payload's metadata {_ORDER_KEY!r} must be a JSON list of tensor names, "
                                f"got {str(order)[:80]}.")
    if sorted(order) != sorted(e.name for e in entries):
        raise WeightUpdateError("Tensor payload's name list does not match its tensors.")
    if len(raw) == data_start:
        data = torch.empty(0, dtype=torch.uint8)
    else:
        with warnings.catch_warnings():  # bytes are immutable: the views are only ever read (copied from)
            warnings.simplefilter("ignore", UserWarning)
            data = torch.frombuffer(raw, dtype=torch.uint8, offset=data_start)
    tensors = dict(entry_views(data, entries))
    return [(name, tensors[name]) for name in order]


def _header(raw: bytes) -> tuple[dict, int]:
    """The parsed JSON header and where the data section starts."""
    not_ours = "Tensor payload is not safetensors bytes"
    n = header_length(raw[:8], len(raw), not_ours, "the payload")
    return parse_header(raw[8:8 + n], not_ours), 8 + n


def _names(header: dict) -> list[str] | None:
    metadata = header.get("__metadata__") or {}
    names = metadata.get(_ORDER_KEY) if isinstance(metadata, dict) else None
    return json.loads(names) if names else None
