"""The attention backend interface and its registry.

A backend writes each layer's new keys/values into the paged KV pool and attends over the pages a
request's page table names. `prepare` runs once per step (shared by all layers); `forward` per layer.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Callable

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


ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {}
# Backends whose modules import optional packages (triton, flashinfer): imported only when asked for.
OPTIONAL_BACKEND_MODULES = {"triton": "runtime.attention.triton_backend",
                            "flashinfer": "runtime.attention.flashinfer_backend"}


def register_attention_backend(name: str) -> Callable[[type[AttentionBackend]], type[AttentionBackend]]:
    def wrap(cls: type[AttentionBackend]) -> type[AttentionBackend]:
        ATTENTION_BACKENDS[name] = cls
        return cls
    return wrap


def create_attention_backend(name: str, kv_pool: KVPool) -> AttentionBackend:
    # Importing the implementations registers them; only the requested one's dependencies matter.
    import runtime.attention.torch_backend  # noqa: F401
    if name in OPTIONAL_BACKEND_MODULES:
        importlib.import_module(OPTIONAL_BACKEND_MODULES[name])
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"Unknown attention backend {name!r}; available: "
                         f"{sorted({*ATTENTION_BACKENDS, *OPTIONAL_BACKEND_MODULES})}.")
    return ATTENTION_BACKENDS[name](kv_pool)
