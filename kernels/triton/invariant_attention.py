"""Batch-invariant paged attention, Triton: one kernel for prefill chunks and decodes alike, in which a query's
output depends only on its own keys, in one reduction order. The reference is
kernels/triton/extend_attention.py's `extend_attention_torch`.

The default kernels choose their reduction from the batch: decode splits the keys by the batch size and
merges the splits, extend walks the cached prefix and then the chunk's own keys in blocks that start where
the chunk starts, and picks its row block from the longest chunk. Any of those makes a token's bits depend on
what else runs, on the chunk size, on a prefix hit, and differ between prefill and decode. Here:

- every key is read from the KV cache through the page table (the caller stores the step's new keys first),
  so a key computed in this chunk and one from a prefix hit are read alike;
- key blocks are aligned to absolute positions (keys [0, BLOCK_N), [BLOCK_N, 2 BLOCK_N), ...) and folded in
  that order by online softmax, one pass, no split-KV. A block a query cannot see changes nothing: from the
  initial state it leaves (m, l, acc) = (-inf, 0, 0), afterwards p = 0 and alpha = exp2(0) = 1 exactly. So
  a query gets the same sequence of operations whichever tile it is in, whatever key range the tile covers;
- tiles are fixed (BLOCK_M query rows, BLOCK_N keys, by dtype only): a decode (one token) and a prefill
  chunk run the same compiled kernel. Rows of a tile are (token, query head of the KV head's group) pairs of
  one request, so a decode's GQA heads share one tile and its key loads.

No split-KV means one program per (request, KV head, row tile): long decodes at small batch use fewer SMs
than the default kernel. That is the price of a fixed order (see `benchmarks/generation.py --deterministic`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.device import check_launchable, dot_in_fp32
from kernels.triton.extend_attention import extend_attention_torch
from kernels.triton.online_softmax import attend_block

__all__ = ["invariant_attention", "extend_attention_torch", "BLOCK_M", "block_n"]

_LOG2E = 1.4426950408889634
# Query rows ((token, head) pairs) per program: one constant for prefill and decode.
BLOCK_M = 32


def block_n(dtype: torch.dtype) -> int:
    """Keys per block, by dtype only: smaller in fp32 so the tiles fit a GPU's shared memory."""
    return 32 if dtype == torch.float32 else 64


# The page table's width varies per step: not specialised on, so every step runs one compiled kernel.
@triton.jit(do_not_specialize=["stride_pb"])
def _invariant_attention(
    Q, Out, KCache, VCache, PageTable, PrefixLens, ExtendLens, QStarts,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kct, stride_kch, stride_vct, stride_vch, stride_pb,
    scale_log2, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    r_lo = tl.program_id(2) * BLOCK_M
    extend_len = tl.load(ExtendLens + b).to(tl.int32)
    if r_lo >= extend_len * GROUP:
        return
    prefix_len = tl.load(PrefixLens + b).to(tl.int32)
    q_start = tl.load(QStarts + b).to(tl.int64)

    r = r_lo + tl.arange(0, BLOCK_M)
    token = r // GROUP
    head = kvh * GROUP + r % GROUP
    row_ok = token < extend_len
    q_pos = prefix_len + token
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(Q + (q_start + token[:, None]) * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    # Keys up to the tile's last query, from a block boundary (with a window: the first block any row sees).
    hi = prefix_len + tl.minimum((r_lo + BLOCK_M - 1) // GROUP + 1, extend_len)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(prefix_len + r_lo // GROUP - window + 1, 0) // BLOCK_N * BLOCK_N
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        ok = pos < hi
        slots = tl.load(PageTable + b * stride_pb + pos, mask=ok, other=0).to(tl.int64)
        kv_mask = ok[:, None] & d_ok[None, :]
        k = tl.load(KCache + slots[:, None] * stride_kct + kvh * stride_kch + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(VCache + slots[:, None] * stride_vct + kvh * stride_vch + d[None, :], mask=kv_mask, other=0.0)
        visible = ok[None, :] & (pos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            visible = visible & (pos[None, :] > q_pos[:, None] - window)
        m, l, acc = attend_block(q, k, v, visible, scale_log2, m, l, acc, DOT_FP32)

    out = acc / tl.where(l > 0.0, l, 1.0)[:, None]   # every real row sees at least its own key
    tl.store(Out + (q_start + token[:, None]) * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def invariant_attention(
    q: torch.Tensor,             # [T, H, D] the step's tokens, request after request
    k_cache: torch.Tensor,       # [S, Hkv, D], the step's own keys and values already stored
    v_cache: torch.Tensor,
    page_table: torch.Tensor,    # [B, >= max(prefix_lens + extend_lens)] slots
    prefix_lens: torch.Tensor,   # [B] keys before each request's first token of the step
    extend_lens: torch.Tensor,   # [B] tokens of the step (1 for a decode)
    q_starts: torch.Tensor,      # [B] first row of each request on the token axis
    max_extend_len: int,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each token over its request's keys 0..its position (the last `sliding_window`
    of them if given), bitwise independent of the batch, the chunking and prefill vs decode."""
    t, h, dim = q.shape
    hkv = k_cache.shape[1]
    group = h // hkv
    if out is None:
        out = torch.empty_like(q)
    b = prefix_lens.shape[0]
    if b == 0 or t == 0:
        return out
    check_launchable(q.device)
    for x in (q, k_cache, v_cache, out):
        assert x.stride(-1) == 1, "the head dimension must be contiguous"
    _invariant_attention[(b, hkv, triton.cdiv(max_extend_len * group, BLOCK_M))](
        q, out, k_cache, v_cache, page_table, prefix_lens, extend_lens, q_starts,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), page_table.stride(0),
        scale * _LOG2E, sliding_window or 0,
        GROUP=group, HEAD_DIM=dim, HAS_WINDOW=sliding_window is not None, DOT_FP32=dot_in_fp32(q.dtype),
        BLOCK_M=BLOCK_M, BLOCK_N=block_n(q.dtype), BLOCK_D=max(16, triton.next_power_of_2(dim)),
    )
    return out
