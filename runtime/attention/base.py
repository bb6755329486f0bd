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
    # Whether decode steps can be captured in CUDA graphs (runtime/cuda_graph_runner.py): the backend
    # then implements reserve_graph_decode and prepare_graph_decode.
    supports_cuda_graph = False

    def __init__(self, kv_pool: KVPool):
        self.kv_pool = kv_pool

    def reserve_graph_decode(self, max_batch_size: int, num_heads: int, head_dim: int, max_width: int) -> None:
        """Allocate, once, whatever decode steps of up to max_batch_size requests with page tables
        max_width wide need, so that a captured step allocates nothing of its own."""
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs.")

    def prepare_graph_decode(self, batch: ForwardBatch) -> None:
        """prepare() for a decode-only batch over fixed buffers: no host sync, shapes fixed by the batch
        size alone (page_table is max_width wide whatever the sequences' lengths)."""
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs.")

    @abstractmethod
    def prepare(self, batch: ForwardBatch) -> None:
        """Build whatever per-step metadata forward() needs and attach it to batch.attn_metadata."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int, batch: ForwardBatch,
                scale: float, sliding_window: int | None = None) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, Hkv, D] for the new tokens; returns [T, H, D]."""

