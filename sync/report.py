"""What an applied update did: the trainer's receipt and the server's metrics."""

from __future__ import annotations

import msgspec


class UpdateReport(msgspec.Struct, frozen=True):
    names: list[str]    # applied, in order
    skipped: list[str]  # accepted but not kept by the model (rotary caches, a tied lm_head)
    num_bytes: int      # bytes written into the model (in the model's dtype)
    seconds: float      # wall time of validation and copies (a stream's own time included)
    digest: str | None  # sync.checksum.update_digest over the applied tensors as they landed; None if off
