"""Paged extend attention (prefill chunks on top of cached prefixes), Triton, with its torch reference.

A batch is ragged: request b adds extend_lens[b] new tokens (rows q_starts[b] onwards of the flat token
axis) on top of prefix_lens[b] tokens already in the KV cache. One program takes BLOCK_M new tokens of
one request and one query head, and attends over
  1. the cached prefix, read through the page table (every prefix key precedes every new token), then
  2. the new tokens' own keys, read from the flat k/v, causally.
A request with one new token (a decode) is a valid row too, so one launch serves a mixed batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.paged_attention import attention_mask, paged_attention_torch
from kernels.triton.device import check_launchable, dot_in_fp32
from kernels.triton.online_softmax import attend_block, key_block_size

_LOG2E = 1.4426950408889634


@triton.jit
def _extend(
    Q, K, V, Out, KCache, VCache, PageTable, PrefixLens, ExtendLens, QStarts,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_kct, stride_kch, stride_vct, stride_vch, stride_pb,
    scale_log2, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    m_lo = tl.program_id(2) * BLOCK_M
    extend_len = tl.load(ExtendLens + b).to(tl.int32)
    if m_lo >= extend_len:
        return
    prefix_len = tl.load(PrefixLens + b).to(tl.int32)
    q_start = tl.load(QStarts + b).to(tl.int64)
    kvh = h // GROUP

    rows = m_lo + tl.arange(0, BLOCK_M)          # index among the request's new tokens
    row_ok = rows < extend_len
    q_pos = prefix_len + rows
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(Q + (q_start + rows[:, None]) * stride_qt + h * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)

    # 1. The cached prefix. With a window, keys before the first row's window are skipped.
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(prefix_len + m_lo - window + 1, 0)
    for start in range(lo, prefix_len, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        ok = pos < prefix_len
        slots = tl.load(PageTable + b * stride_pb + pos, mask=ok, other=0).to(tl.int64)
        kv_mask = ok[:, None] & d_ok[None, :]
        k = tl.load(KCache + slots[:, None] * stride_kct + kvh * stride_kch + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(VCache + slots[:, None] * stride_vct + kvh * stride_vch + d[None, :], mask=kv_mask, other=0.0)
        visible = ok[None, :]
        if HAS_WINDOW:
            visible = visible & (pos[None, :] > q_pos[:, None] - window)
        m, l, acc = attend_block(q, k, v, visible, scale_log2, m, l, acc, DOT_FP32)

    # 2. The new tokens, causally: keys up to the block's last row.
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(m_lo - window + 1, 0)
    hi = tl.minimum(m_lo + BLOCK_M, extend_len)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        ok = cols < hi
        kv_mask = ok[:, None] & d_ok[None, :]
        k = tl.load(K + (q_start + cols[:, None]) * stride_kt + kvh * stride_kh + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + (q_start + cols[:, None]) * stride_vt + kvh * stride_vh + d[None, :], mask=kv_mask, other=0.0)
        visible = ok[None, :] & (cols[None, :] <= rows[:, None])
        if HAS_WINDOW:
            visible = visible & (cols[None, :] > rows[:, None] - window)
        m, l, acc = attend_block(q, k, v, visible, scale_log2, m, l, acc, DOT_FP32)

    out = acc / tl.where(l > 0.0, l, 1.0)[:, None]   # every real row sees at least its own key
    tl.store(Out + (q_start + rows[:, None]) * stride_ot + h * stride_oh + d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def extend_attention(
    q: torch.Tensor,             # [T, H, D] new tokens of all requests, request after request
    k: torch.Tensor,             # [T, Hkv, D] their keys and values
    v: torch.Tensor,
    k_cache: torch.Tensor,       # [S, Hkv, D]
    v_cache: torch.Tensor,
    page_table: torch.Tensor,    # [B, >= max prefix len] slots
    prefix_lens: torch.Tensor,   # [B]
    extend_lens: torch.Tensor,   # [B]
    q_starts: torch.Tensor,      # [B] first row of each request on the token axis
    max_extend_len: int,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    t, h, dim = q.shape
    hkv = k.shape[1]
    if out is None:
        out = torch.empty_like(q)
    b = prefix_lens.shape[0]
    if b == 0 or t == 0:
        return out
    check_launchable(q.device)
    for x in (q, k, v, k_cache, v_cache, out):
        assert x.stride(-1) == 1, "the head dimension must be contiguous"
    block_d = max(16, triton.next_power_of_2(dim))   # tl.dot needs 16 along every axis on a GPU
    block = key_block_size(block_d, q.dtype)
    # Short chunks (decode rows, small prefills) waste less of a block of 16 rows.
    block_m = 16 if max_extend_len <= 16 else block
    _extend[(b, h, triton.cdiv(max_extend_len, block_m))](
        q, k, v, out, k_cache, v_cache, page_table, prefix_lens, extend_lens, q_starts,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), page_table.stride(0),
        scale * _LOG2E, sliding_window or 0,
        GROUP=h // hkv, HEAD_DIM=dim, HAS_WINDOW=sliding_window is not None, DOT_FP32=dot_in_fp32(q.dtype),
        BLOCK_M=block_m, BLOCK_N=block, BLOCK_D=block_d,
    )
    return out


def extend_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           page_table: torch.Tensor, prefix_lens: torch.Tensor, extend_lens: torch.Tensor,
                           scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """The reference: the padded attention of kernels.paged_attention, every key (the new tokens' too,
    already stored) read through the page table."""
    starts = torch.cumsum(extend_lens, 0) - extend_lens
    max_q = int(extend_lens.max())
    offs = torch.arange(max_q, device=q.device)[None, :]
    valid = offs < extend_lens[:, None]
    q_pad = q[torch.where(valid, starts[:, None] + offs, 0)]
    width = int((prefix_lens + extend_lens).max())
    mask = attention_mask(prefix_lens, extend_lens, max_q, width, sliding_window)
    out = paged_attention_torch(q_pad, k_cache, v_cache, page_table[:, :width], mask, scale)
    return out[valid]
