"""Paged decode attention (one new query token per request), Triton, with its torch reference.

Split-KV in two stages: stage 1 runs one program per (request, KV head, split of the keys) and writes
the split's normalised output and log-sum-exp; stage 2 merges the splits of each (request, head). Long
sequences are so spread over many programs even when the batch is small.

The query heads that share a KV head (GQA) are one block of rows, padded to at least 16 so tl.dot has
the shape the GPU compiler accepts; the keys are read once for the whole group. The cache is
slot-indexed, [num_slots, kv_heads, head_dim]; page_table[b, i] is the slot of position i of request b,
so any page size (pages are runs of consecutive slots) is served alike.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.paged_attention import attention_mask, paged_attention_torch
from kernels.triton.device import check_launchable, dot_in_fp32
from kernels.triton.online_softmax import attend_block, key_block_size

_LOG2E = 1.4426950408889634
# choose_num_splits never picks more; a workspace this wide serves every choice.
MAX_SPLITS = 16


@triton.jit
def _decode_split(
    Q, K, V, PageTable, SeqLens, MidO, MidLse, Out,
    stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_pb,
    stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, stride_ob, stride_oh,
    scale_log2, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, HAS_WINDOW: tl.constexpr,
    DOT_FP32: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SeqLens + b).to(tl.int32)
    kv_start = 0
    if HAS_WINDOW:
        kv_start = tl.maximum(seq_len - window, 0)
    # Splits are whole blocks long. (Plain arithmetic: tl.cdiv is slow in the interpreter.)
    split_len = ((seq_len - kv_start + NUM_SPLITS - 1) // NUM_SPLITS + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    lo = kv_start + split * split_len
    hi = tl.minimum(lo + split_len, seq_len)

    rows = tl.arange(0, BLOCK_H)
    heads = kvh * GROUP + rows
    row_ok = rows < GROUP
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.full([BLOCK_H], 0.0, tl.float32)
    acc = tl.full([BLOCK_H, BLOCK_D], 0.0, tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        ok = pos < hi
        slots = tl.load(PageTable + b * stride_pb + pos, mask=ok, other=0).to(tl.int64)
        kv_mask = ok[:, None] & d_ok[None, :]
        k = tl.load(K + slots[:, None] * stride_kt + kvh * stride_kh + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + slots[:, None] * stride_vt + kvh * stride_vh + d[None, :], mask=kv_mask, other=0.0)
        m, l, acc = attend_block(q, k, v, ok[None, :], scale_log2, m, l, acc, DOT_FP32)

    has_keys = l > 0.0
    out = acc / tl.where(has_keys, l, 1.0)[:, None]
    out_mask = row_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:   # the whole answer: no second stage
        tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(Out.dtype.element_ty),
                 mask=out_mask)
    else:
        lse = tl.where(has_keys, (m + tl.log2(tl.where(has_keys, l, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(MidO + b * stride_mb + heads[:, None] * stride_mh + split * stride_ms + d[None, :], out,
                 mask=out_mask)
        tl.store(MidLse + b * stride_lb + heads * stride_lh + split, lse, mask=row_ok)


@triton.jit
def _decode_merge(
    MidO, MidLse, Out,
    stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < NUM_SPLITS
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    lse = tl.load(MidLse + b * stride_lb + h * stride_lh + s, mask=s_ok, other=float("-inf"))
    w = tl.exp(lse - tl.max(lse, 0))   # a split without keys has lse -inf: weight 0
    o = tl.load(MidO + b * stride_mb + h * stride_mh + s[:, None] * stride_ms + d[None, :],
                mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(Out + b * stride_ob + h * stride_oh + d, out.to(Out.dtype.element_ty), mask=d_ok)


def choose_num_splits(batch_size: int, num_kv_heads: int, max_seq_len: int, on_gpu: bool) -> int:
    """Enough programs to fill a GPU (about 256), no split shorter than 64 keys, at most 16 splits.
    The interpreter runs programs one after another, so there one split per (request, head) is best."""
    if not on_gpu:
        return 1
    want = triton.cdiv(256, max(batch_size * num_kv_heads, 1))
    return max(1, min(want, triton.cdiv(max_seq_len, 64), MAX_SPLITS))


def decode_attention(
    q: torch.Tensor,            # [B, H, D]
    k_cache: torch.Tensor,      # [S, Hkv, D]
    v_cache: torch.Tensor,
    page_table: torch.Tensor,   # [B, >= max seq_len] slots
    seq_lens: torch.Tensor,     # [B] keys of each request, its new token's included
    scale: float,
    sliding_window: int | None = None,
    num_splits: int = 1,
    out: torch.Tensor | None = None,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Softmax attention of each request's query over the first seq_lens[b] keys its page table names
    (the last `sliding_window` of them if given). With num_splits > 1, `workspace` (decode_workspace)
    lets a caller allocate the split buffers once for all layers."""
    b, h, dim = q.shape
    hkv = k_cache.shape[1]
    group = h // hkv
    if out is None:
        out = torch.empty_like(q)
    if b == 0:
        return out
    check_launchable(q.device)
    for t in (q, k_cache, v_cache, out):
        assert t.stride(-1) == 1, "the head dimension must be contiguous"
    if num_splits == 1:
        mid_o, mid_lse = out, out   # not touched: stage 1 writes the output
    else:
        mid_o, mid_lse = workspace if workspace is not None else decode_workspace(b, h, dim, num_splits, q.device)
        assert mid_o.shape[2] == num_splits, "workspace was built for another number of splits"
    block_d = max(16, triton.next_power_of_2(dim))   # tl.dot needs 16 along every axis on a GPU
    _decode_split[(b, hkv, num_splits)](
        q, k_cache, v_cache, page_table, seq_lens, mid_o, mid_lse, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        page_table.stride(0), mid_o.stride(0), mid_o.stride(1), mid_o.stride(2) if num_splits > 1 else 0,
        mid_lse.stride(0), mid_lse.stride(1), out.stride(0), out.stride(1), scale * _LOG2E, sliding_window or 0,
        GROUP=group, HEAD_DIM=dim, NUM_SPLITS=num_splits, HAS_WINDOW=sliding_window is not None,
        DOT_FP32=dot_in_fp32(q.dtype), BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_D=block_d, BLOCK_N=key_block_size(block_d, q.dtype),
    )
    if num_splits > 1:
        _decode_merge[(b, h)](
            mid_o, mid_lse, out,
            mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=dim, NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
        )
    return out


def decode_workspace(batch_size: int, num_heads: int, head_dim: int, num_splits: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(batch_size, num_heads, num_splits, head_dim, dtype=torch.float32, device=device),
            torch.empty(batch_size, num_heads, num_splits, dtype=torch.float32, device=device))


def decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           page_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None) -> torch.Tensor:
    """The reference: padded attention of kernels.paged_attention with a one-row query per request."""
    width = int(seq_lens.max())
    mask = attention_mask(seq_lens - 1, torch.ones_like(seq_lens), 1, width, sliding_window)
    return paged_attention_torch(q[:, None], k_cache, v_cache, page_table[:, :width], mask, scale)[:, 0]
