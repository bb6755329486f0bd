"""The wire encoding of routed experts (`meta_info.routed_experts` of /generate): the top-k expert ids each
MoE layer chose for each token, as base64 of a little-endian int16 array of shape [tokens, MoE layers, top_k].

The server encodes (`encode_routed_experts`) and sends the shape beside it (`meta_info.routed_experts_shape`);
a trainer decodes (`decode_routed_experts`) to the tensor `sync.routing_replay.replay_routing` takes. Both
sides live here so they cannot drift apart. int16 holds any expert id below 32768 at half of SGLang's int32.
"""

from __future__ import annotations

import base64

import numpy as np
import torch

WIRE_DTYPE = np.dtype("<i2")


def encode_routed_experts(ids: torch.Tensor) -> tuple[str, list[int]]:
    """(base64 text, shape) of a [tokens, layers, top_k] integer tensor of expert ids."""
    if ids.dim() != 3:
        raise ValueError(f"routed experts must be [tokens, layers, top_k]; got shape {tuple(ids.shape)}.")
    array = ids.detach().to("cpu", torch.int16).numpy().astype(WIRE_DTYPE, copy=False)
    return base64.b64encode(array.tobytes()).decode("ascii"), list(ids.shape)


def decode_routed_experts(data: str, shape: list[int] | tuple[int, ...]) -> torch.Tensor:
    """The [tokens, layers, top_k] int64 tensor of expert ids that `encode_routed_experts` encoded."""
    if len(shape) != 3:
        raise ValueError(f"routed_experts_shape must be [tokens, layers, top_k]; got {list(shape)}.")
    raw = base64.b64decode(data)
    count = int(np.prod(shape))
    if len(raw) != count * WIRE_DTYPE.itemsize:
        raise ValueError(f"routed_experts holds {len(raw)} bytes; shape {list(shape)} needs "
                         f"{count * WIRE_DTYPE.itemsize} (int16).")
    array = np.frombuffer(raw, dtype=WIRE_DTYPE).reshape(shape)
    return torch.from_numpy(array.astype(np.int64))
