"""Attention with FlashInfer's paged-KV kernels: CUDA only, fp16/bf16 caches.

FlashInfer describes a batch's keys as pages in CSR form (indptr, indices, last_page_len). Our pool is
slot-indexed, [num_slots + 1, Hkv, D], and page tables name slots, so the pool is handed over as pages of
one slot ([num_slots, 1, Hkv, D], a view) and a request's page indices are its slots: right for any
allocator page size. The extend part of a batch runs BatchPrefillWithPagedKVCacheWrapper (causal over
prefix + new keys, which are stored first), the decode part BatchDecodeWithPagedKVCacheWrapper.

prepare() builds the CSR indices once per step; FlashInfer's plan() also needs the query heads and the
softmax scale, which only forward() sees, so each (sliding window, scale) pair is planned by the first
layer that uses it in a step. flashinfer is imported when the backend is built (it takes ~10 s), never
when this module is.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import torch

from kernels.paged_attention import store_kv_torch
from runtime.attention.base import AttentionBackend
from runtime.forward_batch import ForwardBatch
from runtime.kv_pool import KVPool

WORKSPACE_BYTES = 128 * 1024 * 1024   # FlashInfer's split-KV scratch, shared by all wrappers


@dataclass
class _Csr:
    """Keys of some requests as FlashInfer pages of one slot."""
    rows: slice                  # the requests' new tokens on the flat token axis
    indptr: torch.Tensor         # [n + 1] int32
    indices: torch.Tensor        # [sum(seq_lens)] int32: slots
    last_page_len: torch.Tensor  # [n] int32, all 1
    qo_indptr: torch.Tensor | None = None   # [n + 1] int32, extend only


@dataclass
class FlashInferMetadata:
    extend: _Csr | None
    decode: _Csr | None
    planned: set = field(default_factory=set)   # (window, scale) planned this step


def _csr(page_table: torch.Tensor, seq_lens: torch.Tensor, rows: slice) -> _Csr:
    width = page_table.shape[1]
    valid = torch.arange(width, device=seq_lens.device)[None, :] < seq_lens[:, None]
    zero = torch.zeros(1, dtype=torch.int32, device=seq_lens.device)
    return _Csr(rows, torch.cat([zero, torch.cumsum(seq_lens, 0).to(torch.int32)]),
                page_table[valid].to(torch.int32), torch.ones_like(seq_lens, dtype=torch.int32))


class FlashInferAttentionBackend(AttentionBackend):
    def __init__(self, kv_pool: KVPool):
        super().__init__(kv_pool)
        if kv_pool.device.type != "cuda":
            raise RuntimeError(f"The flashinfer attention backend needs a CUDA device, not {kv_pool.device}.")
        if kv_pool.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError(f"The flashinfer attention backend serves float16 and bfloat16 KV caches, not "
                               f"{kv_pool.dtype}; use --attention-backend triton for float32.")
        self._flashinfer = importlib.import_module("flashinfer")
        self._workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=kv_pool.device)
        self._wrappers: dict[tuple[int, float], tuple[Any, Any]] = {}
        # Pages of one slot; the pad slot (last row) is left out.
        n, hkv, d = kv_pool.num_slots, kv_pool.num_kv_heads, kv_pool.head_dim
        self._pages = [(k[:n].view(n, 1, hkv, d), v[:n].view(n, 1, hkv, d))
                       for k, v in zip(kv_pool.k_buffers, kv_pool.v_buffers)]

    def prepare(self, batch: ForwardBatch) -> None:
        ne, b = batch.num_extend, batch.batch_size
        extend = decode = None
        num_extend_tokens = 0
        if ne > 0:
            ext = batch.extend_lens[:ne]
            num_extend_tokens = int(ext.sum())
            extend = _csr(batch.page_table[:ne], batch.seq_lens[:ne], slice(0, num_extend_tokens))
            zero = torch.zeros(1, dtype=torch.int32, device=ext.device)
            extend.qo_indptr = torch.cat([zero, torch.cumsum(ext, 0).to(torch.int32)])
        if ne < b:
            decode = _csr(batch.page_table[ne:], batch.seq_lens[ne:], slice(num_extend_tokens, None))
        batch.attn_metadata = FlashInferMetadata(extend, decode)

    def _plan(self, meta: FlashInferMetadata, window: int, scale: float, num_heads: int) -> tuple[Any, Any]:
        key = (window, scale)
        if key not in self._wrappers:
            fi = self._flashinfer
            group = num_heads // self.kv_pool.num_kv_heads
            self._wrappers[key] = (fi.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD"),
                                   fi.BatchDecodeWithPagedKVCacheWrapper(self._workspace, "NHD",
                                                                         use_tensor_cores=group >= 4))
        prefill, decode = self._wrappers[key]
        if key not in meta.planned:
            shape = (num_heads, self.kv_pool.num_kv_heads, self.kv_pool.head_dim, 1)   # heads, kv heads, dim, page
            types = dict(q_data_type=self.kv_pool.dtype, kv_data_type=self.kv_pool.dtype)
            if meta.extend is not None:
                e = meta.extend
                prefill.plan(e.qo_indptr, e.indptr, e.indices, e.last_page_len, *shape, causal=True,
                             sm_scale=scale, window_left=window, **types)
            if meta.decode is not None:
                d = meta.decode
                decode.plan(d.indptr, d.indices, d.last_page_len, *shape, sm_scale=scale, window_left=window,
                            **types)
            meta.planned.add(key)
        return prefill, decode

    def forward(self, q, k, v, layer_id, batch, scale, sliding_window=None):
        store_kv_torch(self.kv_pool.k_buffers[layer_id], self.kv_pool.v_buffers[layer_id], batch.out_slots, k, v)
        meta: FlashInferMetadata = batch.attn_metadata
        # FlashInfer's window_left counts the keys visible left of the query's own: ours, minus one.
        window = -1 if sliding_window is None else sliding_window - 1
        prefill, decode = self._plan(meta, window, scale, q.shape[1])
        q = q.contiguous()
        out = torch.empty_like(q)
        for part, wrapper in ((meta.extend, prefill), (meta.decode, decode)):
            if part is not None:
                wrapper.run(q[part.rows], self._pages[layer_id], out=out[part.rows])
        return out
