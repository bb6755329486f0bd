"""Attention for `--enable-deterministic-inference` on the Triton backend (CUDA; CPU tensors in Triton's
interpreter): a token's output is the same bits whatever else runs in the step, whether it is prefilled (in
any chunk) or decoded, and whether its keys came from a prefix-cache hit or were just computed.

The step's new keys and values are stored first; then one launch of kernels/triton/invariant_attention.py
attends every request, prefill chunks and decodes alike (a decode is a chunk of one token), each over its
own keys read through its page table. No cascade and no split-KV: both would make a request's sums depend
on its neighbours or on the batch size. Decode steps are not captured in CUDA graphs in this mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.triton.device import check_launchable
from kernels.triton.invariant_attention import invariant_attention
from kernels.triton.kv_store import store_kv
from runtime.attention.base import AttentionBackend
from runtime.forward_batch import ForwardBatch
from runtime.kv_pool import KVPool


@dataclass
class InvariantAttentionMetadata:
    q_starts: torch.Tensor       # [B] first row of each request on the token axis
    max_extend_len: int


class TritonInvariantAttentionBackend(AttentionBackend):
    def __init__(self, kv_pool: KVPool):
        super().__init__(kv_pool)
        check_launchable(kv_pool.device)

    def prepare(self, batch: ForwardBatch) -> None:
        ext = batch.extend_lens
        # Decodes are 1 token each: the longest chunk is among the extends (one host sync, none for decode).
        longest = int(ext[:batch.num_extend].max()) if batch.num_extend else 1
        batch.attn_metadata = InvariantAttentionMetadata(torch.cumsum(ext, 0) - ext, longest)

    def forward(self, q, k, v, layer_id, batch, scale, sliding_window=None):
        k_cache = self.kv_pool.k_buffers[layer_id]
        v_cache = self.kv_pool.v_buffers[layer_id]
        store_kv(k_cache, v_cache, batch.out_slots, k, v)
        meta: InvariantAttentionMetadata = batch.attn_metadata
        # The kernel reads rows with their strides; the head dimension must be contiguous.
        q = q if q.stride(-1) == 1 else q.contiguous()
        return invariant_attention(q, k_cache, v_cache, batch.page_table, batch.prefix_lens, batch.extend_lens,
                                   meta.q_starts, meta.max_extend_len, scale, sliding_window)
