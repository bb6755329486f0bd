"""Write new tokens' keys and values into their KV cache slots, Triton; the reference is
kernels.paged_attention.store_kv_torch.

One program copies BLOCK_T tokens x all KV heads of keys and of values, so the new k/v (usually strided
views of the fused qkv projection) are read once and never made contiguous first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.paged_attention import store_kv_torch
from kernels.triton.device import check_launchable

__all__ = ["store_kv", "store_kv_torch"]


@triton.jit
def _store_kv(
    K, V, KCache, VCache, Slots, num_tokens,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_kct, stride_kch, stride_vct, stride_vch,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HD: tl.constexpr,
):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = tok < num_tokens
    slots = tl.load(Slots + tok, mask=tok_ok, other=0).to(tl.int64)
    i = tl.arange(0, BLOCK_HD)            # head * HEAD_DIM + d, flattened
    head = i // HEAD_DIM
    d = i % HEAD_DIM
    mask = tok_ok[:, None] & (i < NUM_HEADS * HEAD_DIM)[None, :]
    rows = tok.to(tl.int64)[:, None]
    k = tl.load(K + rows * stride_kt + head[None, :] * stride_kh + d[None, :], mask=mask)
    v = tl.load(V + rows * stride_vt + head[None, :] * stride_vh + d[None, :], mask=mask)
    tl.store(KCache + slots[:, None] * stride_kct + head[None, :] * stride_kch + d[None, :], k, mask=mask)
    tl.store(VCache + slots[:, None] * stride_vct + head[None, :] * stride_vch + d[None, :], v, mask=mask)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor) -> None:
    """k_cache[slots] = k; v_cache[slots] = v (k/v [T, Hkv, D], caches [S, Hkv, D], same dtype)."""
    t, hkv, dim = k.shape
    if t == 0:
        return
    check_launchable(k.device)
    assert k.dtype == k_cache.dtype and v.dtype == v_cache.dtype, "store_kv does not convert dtypes"
    for x in (k, v, k_cache, v_cache):
        assert x.stride(-1) == 1, "the head dimension must be contiguous"
    block_hd = triton.next_power_of_2(hkv * dim)
    block_t = max(1, min(16, 4096 // block_hd))
    _store_kv[(triton.cdiv(t, block_t),)](
        k, v, k_cache, v_cache, slots, t,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        NUM_HEADS=hkv, HEAD_DIM=dim, BLOCK_T=block_t, BLOCK_HD=block_hd,
    )
