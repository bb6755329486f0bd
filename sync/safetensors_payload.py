"""The `update_weights_from_tensor` payload: named tensors as safetensors bytes, base64 for JSON.

Never pickle: safetensors is a JSON header plus raw bytes, so decoding a payload cannot run code. The
tensor order is kept in the header's metadata (safetensors itself stores tensors sorted).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from sync.errors import WeightUpdateError

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


def decode_named_tensors(payload: str | bytes) -> list[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) in the order they were encoded; raises WeightUpdateError on anything else."""
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise WeightUpdateError(f"Tensor payload is not valid base64: {e}") from None
    # A pickle (protocol 2+) starts with 0x80; so does a safetensors payload whose JSON header is 128 bytes
    # long (its 8-byte length, then "{"). Either way nothing here runs code: load() only parses.
    if raw[:1] == b"\x80" and raw[8:9] != b"{":
        raise WeightUpdateError("Tensor payload is a pickle; only safetensors bytes are accepted.")
    try:
        tensors = load(raw)
    except (SafetensorError, ValueError, KeyError, TypeError) as e:
        raise WeightUpdateError(f"Tensor payload is not safetensors bytes: {e}") from None
    try:
        order = _payload_order(raw) or list(tensors)
    except (ValueError, TypeError, AttributeError) as e:
        raise WeightUpdateError(f"Tensor payload's metadata {_ORDER_KEY!r} is not a JSON list of tensor names: "
                                f"{e}") from None
    if not isinstance(order, list) or any(not isinstance(n, str) for n in order):
        raise WeightUpdateError(f"Tensor payload's metadata {_ORDER_KEY!r} must be a JSON list of tensor names, "
                                f"got {str(order)[:80]}.")
    if sorted(order) != sorted(tensors):
        raise WeightUpdateError("Tensor payload's name list does not match its tensors.")
    return [(name, tensors[name]) for name in order]


def _payload_order(raw: bytes) -> list[str] | None:
    # The header is an 8-byte little-endian length then JSON; load() has already validated it.
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    names = header.get("__metadata__", {}).get(_ORDER_KEY)
    return json.loads(names) if names else None
