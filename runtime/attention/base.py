"""The attention backend interface (runtime/attention/registry.py names the implementations).

A backend writes each layer's new keys/values into the paged KV pool and attends over the pages a
request's page table names. `prepare` runs once per step (shared by all layers); `forward` per layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from runtime.forward_batch import ForwardBatch
from runtime.kv_pool import KVPool


class AttentionBackend(ABC):
    def __init__(self, kv_pool: KVPool):
        self.kv_pool = kv_pool

    @abstractmethod
    def prepare(self, batch: ForwardBatch) -> None:
        """Build whatever per-step metadata forward() needs and attach it to batch.attn_metadata."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int, batch: ForwardBatch,
                scale: float, sliding_window: int | None = None) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, Hkv, D] for the new tokens; returns [T, H, D]."""

