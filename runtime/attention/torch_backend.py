"""Attention in plain torch over the paged KV pool: the CPU path and the reference for GPU kernels."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels.paged_attention import attention_mask, paged_attention_torch, store_kv_torch
from runtime.attention.base import AttentionBackend, register_attention_backend
from runtime.forward_batch import ForwardBatch


@dataclass
class _Group:
    """Requests of one kind (prefill chunks or decodes), padded to a rectangle."""
    token_start: int             # first row of the group on the flat token axis
    num_tokens: int
    q_index: torch.Tensor        # [B, Lq] flat token row of each padded query (pads point at row 0)
    flat_pos: torch.Tensor       # [num_tokens] where each real query sits in the padded [B*Lq] layout
    page_table: torch.Tensor     # [B, Lk]
    prefix_lens: torch.Tensor
    extend_lens: torch.Tensor
    masks: dict = field(default_factory=dict)  # sliding window -> [B, Lq, Lk] mask

    def mask(self, sliding_window: int | None) -> torch.Tensor:
        if sliding_window not in self.masks:
            self.masks[sliding_window] = attention_mask(
                self.prefix_lens, self.extend_lens, self.q_index.shape[1], self.page_table.shape[1], sliding_window)
        return self.masks[sliding_window]


@register_attention_backend("torch")
class TorchAttentionBackend(AttentionBackend):
    def prepare(self, batch: ForwardBatch) -> None:
        groups = []
        ne = batch.num_extend
        if ne > 0:
            groups.append(self._group(batch, 0, ne, 0))
        if ne < batch.batch_size:
            start = int(batch.extend_lens[:ne].sum()) if ne else 0
            groups.append(self._group(batch, ne, batch.batch_size, start))
        batch.attn_metadata = groups

    def _group(self, batch: ForwardBatch, lo: int, hi: int, token_start: int) -> _Group:
        extend_lens = batch.extend_lens[lo:hi]
        prefix_lens = batch.prefix_lens[lo:hi]
        seq_lens = batch.seq_lens[lo:hi]
        max_q = int(extend_lens.max())
        max_k = int(seq_lens.max())
        starts = torch.cumsum(extend_lens, 0) - extend_lens
        offs = torch.arange(max_q)[None, :]
        valid = offs < extend_lens[:, None]
        q_index = torch.where(valid, starts[:, None] + offs + token_start, 0)
        rows = torch.arange(hi - lo)[:, None] * max_q + offs
        flat_pos = rows[valid]
        return _Group(token_start, int(extend_lens.sum()), q_index, flat_pos,
                      batch.page_table[lo:hi, :max_k], prefix_lens, extend_lens)

    def forward(self, q, k, v, layer_id, batch, scale, sliding_window=None):
        k_cache = self.kv_pool.k_buffers[layer_id]
        v_cache = self.kv_pool.v_buffers[layer_id]
        store_kv_torch(k_cache, v_cache, batch.out_slots, k, v)
        out = torch.empty_like(q)
        for g in batch.attn_metadata:
            q_pad = q[g.q_index]  # [B, Lq, H, D]
            o = paged_attention_torch(q_pad, k_cache, v_cache, g.page_table, g.mask(sliding_window), scale)
            out[g.token_start:g.token_start + g.num_tokens] = o.reshape(-1, *o.shape[2:])[g.flat_pos]
        return out
