"""Batch-invariant kernels (torch, CPU): a row's result never depends on the other rows of the call.

What varies between a request run alone and the same request in a batch, prefilled or decoded, chunked or
not, is only the shape of every call: how many rows a matmul has and how many keys an attention reduces
over. These functions fix the reduction order of each output element against those shapes:

- `invariant_linear`: MKL's sgemm picks its kernel (and so its summation order over K) from the shape; on
  this build (MKL 2024.2, AVX-512) every M >= MIN_GEMM_ROWS gives bitwise the same row whatever M is and
  wherever the row sits (measured for M up to 4096 and K, N from 32 to 49152: tests/test_deterministic.py
  keeps checking it, at 1 and 2 threads), while M = 1..3 take other paths. So fewer rows are zero-padded
  up to MIN_GEMM_ROWS, and with more threads small counts to a multiple of it (padded_row_count), and the
  row count never chooses the kernel. The reduction dimension K is the weight's, always the same.
- `invariant_attention`: one query row's output depends only on its own keys. Keys are padded to a multiple
  of KV_CHUNK, so the score matmul always sees N a multiple of KV_CHUNK (columns are invariant for N >= 16)
  and K = head_dim; softmax's max is exact in any order; probabilities times V, and times a column of ones
  for the denominator, are summed chunk by chunk, each chunk a matmul with K = KV_CHUNK exactly, and the
  chunks are added in order by a sequential scan (masked keys contribute exact zeros, so a row that sees
  fewer keys than the longest in its call adds zeros at the end: the same bits as when it is alone).

Cost (SmolLM2 shapes, one thread): a 4-row sgemm takes about 2x a 1-row one (6.6x for the down
projection), which is most of the single-stream overhead; batches of 4 rows or more pay nothing there.
Attention is a few batched matmuls over fixed-shape tiles, about as fast as the default path's SDPA.

Every op here is differentiable, so the trainer-side forward (runtime/deterministic.py) runs them with
autograd and gets the rollout's bits with ordinary gradients. The guarantee is for one process's thread
count (the benchmarks and tests run one thread, as the servers do by default); a different count may
split reductions differently.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Smallest row count whose sgemm rows are invariant (measured: see the module docstring).
MIN_GEMM_ROWS = 4
# Below this many rows, the row count is padded to a multiple of MIN_GEMM_ROWS (see padded_row_count).
THREADED_ROWS = 64
# Keys are reduced in chunks of this many; a multiple of 16 keeps the score columns invariant.
KV_CHUNK = 64
# sgemm columns are invariant only from this many columns on (N = 1, 2, 3, 5 take other paths).
MIN_VALUE_COLUMNS = 16


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear whose every output row is bitwise the same whatever the other rows are (any leading dims)."""
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    m, n = rows.shape[0], weight.shape[0]
    padded = padded_row_count(m)
    if padded > m:
        rows = torch.cat([rows, rows.new_zeros(padded - m, rows.shape[1])])
    if n < MIN_VALUE_COLUMNS:  # a MoE router or a shared-expert gate: their narrow sgemm paths treat tail rows apart
        weight = torch.cat([weight, weight.new_zeros(MIN_VALUE_COLUMNS - n, weight.shape[1])])
        bias = None if bias is None else torch.cat([bias, bias.new_zeros(MIN_VALUE_COLUMNS - n)])
    out = F.linear(rows.contiguous(), weight, bias)
    if padded > m or n < MIN_VALUE_COLUMNS:
        out = out[:m, :n]
    return out.reshape(*lead, out.shape[-1])


def padded_row_count(m: int) -> int:
    """The row count invariant_linear hands sgemm for m rows: at least MIN_GEMM_ROWS, and below
    THREADED_ROWS a multiple of MIN_GEMM_ROWS. With 2 or 8 threads MKL splits 5-7 and 9-11 rows between
    threads so that a part takes a small-M path (measured: those rows got other bits); padded so, every
    row count from 1 to 300 gives the same bits at 1, 2, 3, 4 and 8 threads on the 2-core test machines."""
    if m >= THREADED_ROWS:
        return m
    return max(MIN_GEMM_ROWS, -(-m // MIN_GEMM_ROWS) * MIN_GEMM_ROWS)


def padded_key_len(num_keys: int) -> int:
    """The key count an attention call pads to: a positive multiple of KV_CHUNK."""
    return max(1, -(-num_keys // KV_CHUNK)) * KV_CHUNK


def invariant_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                        key_len: torch.Tensor, scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention, each query row alone in its reduction order.

    q: [B, Hkv, M, D] (M query rows per kv head: query heads of the group x tokens, any order), k/v:
    [B, Hkv, L, D] with L a multiple of KV_CHUNK (key j at position j; rows past the real keys hold any
    finite values), q_pos: [B, M] the position of each query row (it sees keys 0..q_pos), key_len: [B]
    keys that exist (rows at or past it are never seen). M must be at least MIN_GEMM_ROWS: callers pad.
    Returns [B, Hkv, M, D].

    The products run head-major, over Hkv * B matrices: keys and values gathered as [Hkv, B, L, D] (see
    gather_head_major) and passed transposed are read with no copy. Each chunk's probabilities times V and
    times a column of ones (the softmax denominator, summed in the same chunks) are two products of fixed
    shape, so no [V | 1] copy of the values is made either.
    """
    b, hkv, m, d = q.shape
    length = k.shape[2]
    if length % KV_CHUNK or m < MIN_GEMM_ROWS:
        raise ValueError(f"invariant_attention needs keys padded to a multiple of {KV_CHUNK} and at least "
                         f"{MIN_GEMM_ROWS} query rows; got {length} keys and {m} rows.")
    key_pos = torch.arange(length, device=q.device)
    seen = (key_pos[None, None, :] <= q_pos[:, :, None]) & (key_pos[None, None, :] < key_len[:, None, None])
    if sliding_window is not None:
        seen &= key_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    qh = q.transpose(0, 1).reshape(hkv * b, m, d)
    kh = k.transpose(0, 1).reshape(hkv * b, length, d)
    vh = v.transpose(0, 1).reshape(hkv * b, length, d)
    if d < MIN_VALUE_COLUMNS:  # narrower products are not column-invariant (tiny test models only)
        vh = torch.cat([vh, vh.new_zeros(hkv * b, length, MIN_VALUE_COLUMNS - d)], dim=-1)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale                     # [Hkv*B, M, L]
    scores = scores.view(hkv, b, m, length).masked_fill(~seen[None], float("-inf")).view(hkv * b, m, length)
    probs = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    n_chunks = length // KV_CHUNK
    probs = probs.view(hkv * b, m, n_chunks, KV_CHUNK).transpose(1, 2)          # [Hkv*B, C, M, KV_CHUNK]
    numer = torch.matmul(probs, vh.view(hkv * b, n_chunks, KV_CHUNK, vh.shape[-1]))  # [Hkv*B, C, M, >=D]
    ones = probs.new_ones(1, KV_CHUNK)   # invariant_linear pads it to MIN_VALUE_COLUMNS columns
    denom = invariant_linear(probs.reshape(-1, KV_CHUNK), ones).view(hkv * b, n_chunks, m, 1)
    numer = numer.cumsum(dim=1)[:, -1, :, :d]                                   # chunks in order
    denom = denom.cumsum(dim=1)[:, -1]
    return (numer / denom).view(hkv, b, m, d).transpose(0, 1)


def head_major_index(table: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Row numbers, into a cache viewed as [S * Hkv, D], of the keys table [B, L] names, head by head:
    [Hkv * B * L]. Computed once per step, used by every layer."""
    heads = torch.arange(num_kv_heads, device=table.device)[:, None]
    return (table.reshape(1, -1) * num_kv_heads + heads).reshape(-1)


def gather_head_major(cache: torch.Tensor, index: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """cache [S, Hkv, D] rows of head_major_index(table) as [Hkv, B, L, D], in one copy: the layout
    invariant_attention reads with no other copy (pass it `.transpose(0, 1)`). Gathering [B, L, Hkv, D]
    and permuting costs two copies, 2-7x slower (measured at B = 128, L = 192)."""
    slots, hkv, d = cache.shape
    return cache.view(slots * hkv, d).index_select(0, index).view(hkv, batch, length, d)
