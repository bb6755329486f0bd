"""Batch-invariant kernels (torch, CPU): a row's result never depends on the other rows of the call.

What varies between a request run alone and the same request in a batch, prefilled or decoded, chunked or
not, is only the shape of every call: how many rows a matmul has and how many keys an attention reduces
over. These functions fix the reduction order of each output element against those shapes:

- `invariant_linear`: MKL's sgemm picks its kernel (and so its summation order over K) from the shape; on
  this build (MKL 2024.2, AVX-512) every M >= MIN_GEMM_ROWS gives bitwise the same row whatever M is and
  wherever the row sits (measured for M up to 4096 and K, N from 32 to 49152: tests/test_deterministic.py
  keeps checking it), while M = 1..3 take other paths. So fewer rows are zero-padded up to MIN_GEMM_ROWS
  and the row count never chooses the kernel. The reduction dimension K is the weight's, always the same.
- `invariant_attention`: one query row's output depends only on its own keys. Keys are padded to a multiple
  of KV_CHUNK, so the score matmul always sees N a multiple of KV_CHUNK (columns are invariant for N >= 16)
  and K = head_dim; softmax's max is exact in any order; probabilities times [V | 1] are summed chunk by
  chunk, each chunk a matmul with K = KV_CHUNK exactly, and the chunks are added in order by a sequential
  scan (masked keys contribute exact zeros, so a row that sees fewer keys than the longest in its call adds
  zeros at the end: the same bits as when it is alone). The ones column makes the softmax denominator the
  same sum as the numerator.

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
# Keys are reduced in chunks of this many; a multiple of 16 keeps the score columns invariant.
KV_CHUNK = 64
# sgemm columns are invariant only from this many columns on (N = 1, 2, 3, 5 take other paths).
MIN_VALUE_COLUMNS = 16


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear whose every output row is bitwise the same whatever the other rows are (any leading dims)."""
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    m, n = rows.shape[0], weight.shape[0]
    if m < MIN_GEMM_ROWS:
        rows = torch.cat([rows, rows.new_zeros(MIN_GEMM_ROWS - m, rows.shape[1])])
    if n < MIN_VALUE_COLUMNS:  # a MoE router or a shared-expert gate: their narrow sgemm paths treat tail rows apart
        weight = torch.cat([weight, weight.new_zeros(MIN_VALUE_COLUMNS - n, weight.shape[1])])
        bias = None if bias is None else torch.cat([bias, bias.new_zeros(MIN_VALUE_COLUMNS - n)])
    out = F.linear(rows.contiguous(), weight, bias)
    if m < MIN_GEMM_ROWS or n < MIN_VALUE_COLUMNS:
        out = out[:m, :n]
    return out.reshape(*lead, out.shape[-1])


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
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale                       # [B, Hkv, M, L]
    scores = scores.masked_fill(~seen[:, None], float("-inf"))
    probs = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    n_chunks = length // KV_CHUNK
    probs = probs.view(b, hkv, m, n_chunks, KV_CHUNK).transpose(2, 3)            # [B, Hkv, C, M, KV_CHUNK]
    # [V | 1 | 0 ...]: at least MIN_VALUE_COLUMNS columns, since narrower products are not column-invariant.
    width = max(MIN_VALUE_COLUMNS, d + 1)
    v1 = torch.cat([v, v.new_ones(b, hkv, length, 1), v.new_zeros(b, hkv, length, width - d - 1)], dim=-1)
    partial = torch.matmul(probs, v1.view(b, hkv, n_chunks, KV_CHUNK, width))   # [B, Hkv, C, M, width]
    total = partial.cumsum(dim=2)[:, :, -1]                                      # chunks in order
    return total[..., :d] / total[..., d:d + 1]
