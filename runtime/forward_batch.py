"""The tensors of one forward step: new tokens of every request in the batch, flattened.

Requests come in two groups: the first `num_extend` ones add a chunk of prompt (prefill, possibly on top
of a cached prefix), the rest add one decoded token each. Linear layers see only the flat token axis
(no padding); the attention backend uses the per-request fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from runtime.routing_capture import RoutingCapture


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor      # [T] token ids
    positions: torch.Tensor      # [T] absolute position of each token in its sequence
    out_slots: torch.Tensor      # [T] KV slot each token's key/value is written to
    prefix_lens: torch.Tensor    # [B] tokens already in KV before this step
    extend_lens: torch.Tensor    # [B] tokens added this step (1 for decode)
    seq_lens: torch.Tensor       # [B] prefix_lens + extend_lens
    page_table: torch.Tensor     # [B, max(seq_lens)] KV slot of every position of every request
    num_extend: int              # requests [0, num_extend) are prefill chunks, the rest decode
    logits_indices: torch.Tensor  # [R] rows of the flat token axis whose logits are wanted
    attn_metadata: Any = field(default=None)  # built by the attention backend once per step
    routing: RoutingCapture | None = None  # set to record the experts MoE layers choose this step

    @property
    def batch_size(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])
