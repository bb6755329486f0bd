"""Attention backends by name (`ServerArgs.attention_backend`), as "module:class".

A backend's module is imported only when it is chosen, so its dependencies (Triton, FlashInfer) are needed
only by whoever picks it. A new backend is a subclass of runtime/attention/base.py's AttentionBackend in
its own module and one line here.
"""

from __future__ import annotations

import pkgutil

from runtime.attention.base import AttentionBackend
from runtime.kv_pool import KVPool

ATTENTION_BACKENDS: dict[str, str] = {
    "torch": "runtime.attention.torch_backend:TorchAttentionBackend",
    "triton": "runtime.attention.triton_backend:TritonAttentionBackend",
    "flashinfer": "runtime.attention.flashinfer_backend:FlashInferAttentionBackend",
    # --enable-deterministic-inference picks one of these (runtime/deterministic.py): CPU torch, Triton.
    "batch_invariant": "runtime.attention.batch_invariant_backend:BatchInvariantAttentionBackend",
    "triton_invariant": "runtime.attention.triton_invariant_backend:TritonInvariantAttentionBackend",
}


def create_attention_backend(name: str, kv_pool: KVPool) -> AttentionBackend:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"Unknown attention backend {name!r}; available: {sorted(ATTENTION_BACKENDS)}.")
    backend_cls: type[AttentionBackend] = pkgutil.resolve_name(ATTENTION_BACKENDS[name])
    return backend_cls(kv_pool)
