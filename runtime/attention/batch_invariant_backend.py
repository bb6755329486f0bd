"""Attention for `--enable-deterministic-inference` (CPU torch): a token's output is the same bits whatever
else runs in the step, whether it is prefilled (in any chunk) or decoded, and whether its keys came from a
prefix-cache hit or were just computed.

Every request is attended by kernels/batch_invariant.py's `invariant_attention` over its own keys, padded to
a multiple of KV_CHUNK: prefill chunks one request (and one tile of QUERY_TILE tokens) at a time, decodes
all together (one query row group per request). No cascade: sharing a prefix's keys between requests would
make a request's sums depend on its neighbours. The trainer-side forward (runtime/trainer_forward.py) lays
its queries and keys out the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.batch_invariant import (MIN_GEMM_ROWS, gather_head_major, head_major_index, invariant_attention,
                                     padded_key_len)
from kernels.paged_attention import store_kv_torch
from runtime.attention.base import AttentionBackend
from runtime.forward_batch import ForwardBatch

# Prefill queries per call: bounds the [rows, keys] score tensor of a long chunk.
QUERY_TILE = 256


@dataclass
class _Call:
    """One invariant_attention call: `rows` of the flat token axis, as B requests x tokens_per_request."""
    token_start: int
    num_tokens: int
    tokens_per_request: int      # 1 for the decode call (B decodes), else the tile's length (B = 1)
    key_table: torch.Tensor      # [B, L] slot of each key position, L a multiple of KV_CHUNK
    key_rows: torch.Tensor       # head_major_index(key_table): where gather_head_major reads them
    key_len: torch.Tensor        # [B] keys that exist
    positions: torch.Tensor      # [B, tokens_per_request]


def query_rows(q: torch.Tensor, num_kv_heads: int, tokens_per_request: int) -> torch.Tensor:
    """[B * n, H, D] queries -> [B, Hkv, M, D] with row t * group + j (token t, head j of the group), M padded
    with zero rows up to MIN_GEMM_ROWS."""
    t, h, d = q.shape
    n = tokens_per_request
    group = h // num_kv_heads
    rows = q.view(t // n, n, num_kv_heads, group, d).permute(0, 2, 1, 3, 4).reshape(t // n, num_kv_heads, n * group, d)
    if n * group < MIN_GEMM_ROWS:
        rows = torch.cat([rows, rows.new_zeros(t // n, num_kv_heads, MIN_GEMM_ROWS - n * group, d)], dim=2)
    return rows


def row_positions(positions: torch.Tensor, group: int) -> torch.Tensor:
    """[B, n] token positions -> [B, M] position of every query row (padding rows at 0: they see key 0)."""
    pos = positions.repeat_interleave(group, dim=1)
    if pos.shape[1] < MIN_GEMM_ROWS:
        pos = torch.cat([pos, pos.new_zeros(pos.shape[0], MIN_GEMM_ROWS - pos.shape[1])], dim=1)
    return pos


def output_rows(o: torch.Tensor, num_heads: int, tokens_per_request: int) -> torch.Tensor:
    """Inverse of query_rows: [B, Hkv, M, D] -> [B * n, H, D]."""
    b, hkv, _, d = o.shape
    n = tokens_per_request
    group = num_heads // hkv
    return o[:, :, :n * group].reshape(b, hkv, n, group, d).permute(0, 2, 1, 3, 4).reshape(b * n, num_heads, d)


class BatchInvariantAttentionBackend(AttentionBackend):
    def prepare(self, batch: ForwardBatch) -> None:
        calls: list[_Call] = []
        pad = self.kv_pool.pad_slot
        heads = self.kv_pool.num_kv_heads
        extend_lens = batch.extend_lens.tolist()
        prefix_lens = batch.prefix_lens.tolist()
        token = 0
        for i in range(batch.num_extend):
            for t0 in range(0, extend_lens[i], QUERY_TILE):
                n = min(QUERY_TILE, extend_lens[i] - t0)
                keys = prefix_lens[i] + t0 + n
                table = self._table(batch.page_table[i:i + 1], [keys], pad)
                calls.append(_Call(token + t0, n, n, table, head_major_index(table, heads),
                                   batch.seq_lens.new_tensor([keys]),
                                   batch.positions[token + t0:token + t0 + n].view(1, n)))
            token += extend_lens[i]
        num_decode = batch.batch_size - batch.num_extend
        if num_decode:
            seq = batch.seq_lens[batch.num_extend:]
            table = self._table(batch.page_table[batch.num_extend:], seq.tolist(), pad)
            calls.append(_Call(token, num_decode, 1, table, head_major_index(table, heads), seq,
                               batch.positions[token:token + num_decode].view(num_decode, 1)))
        batch.attn_metadata = calls

    @staticmethod
    def _table(page_table: torch.Tensor, key_lens: list[int], pad: int) -> torch.Tensor:
        """[B, L] slots of keys 0..key_len - 1 of each row, padded with the pad slot to L = padded_key_len."""
        width = padded_key_len(max(key_lens))
        table = torch.full((page_table.shape[0], width), pad, dtype=page_table.dtype, device=page_table.device)
        used = min(width, page_table.shape[1])
        table[:, :used] = page_table[:, :used]
        key_pos = torch.arange(width, device=table.device)[None, :]
        lens = torch.tensor(key_lens, device=table.device)[:, None]
        return table.masked_fill(key_pos >= lens, pad)

    def forward(self, q, k, v, layer_id, batch, scale, sliding_window=None):
        k_cache = self.kv_pool.k_buffers[layer_id]
        v_cache = self.kv_pool.v_buffers[layer_id]
        store_kv_torch(k_cache, v_cache, batch.out_slots, k, v)
        num_heads, num_kv_heads = q.shape[1], k.shape[1]
        out = torch.empty_like(q)
        for c in batch.attn_metadata:
            rows = slice(c.token_start, c.token_start + c.num_tokens)
            b, length = c.key_table.shape
            keys = gather_head_major(k_cache, c.key_rows, b, length).transpose(0, 1)   # [B, Hkv, L, D], head-major
            values = gather_head_major(v_cache, c.key_rows, b, length).transpose(0, 1)
            o = invariant_attention(query_rows(q[rows], num_kv_heads, c.tokens_per_request), keys, values,
                                    row_positions(c.positions, num_heads // num_kv_heads), c.key_len, scale,
                                    sliding_window)
            out[rows] = output_rows(o, num_heads, c.tokens_per_request)
        return out
