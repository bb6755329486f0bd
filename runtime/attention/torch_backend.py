"""Attention in plain torch over the paged KV pool: the CPU path and the reference for GPU kernels.

Prefill chunks are padded to a rectangle and run through SDPA with a causal mask. Decodes use cascade
attention: consecutive decode requests whose page tables start with the same slots (the n samples of
one prompt, which the scheduler puts side by side) read that shared prefix once per group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels.paged_attention import (attention_mask, cascade_decode_attention_torch, paged_attention_torch,
                                     store_kv_torch)
from runtime.attention.base import AttentionBackend
from runtime.forward_batch import ForwardBatch

# Sharing fewer tokens than this is not worth a group of its own.
MIN_SHARED_PREFIX = 16


@dataclass
class _ExtendGroup:
    """Prefill chunks, padded to a rectangle."""
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


@dataclass
class _DecodeGroup:
    """One new token per request; `cascade` holds the shared-prefix split of cascade attention."""
    token_start: int
    num_tokens: int
    max_seq_len: int
    cascade: dict                # keyword arguments of cascade_decode_attention_torch
    fallback: _ExtendGroup       # plain padded attention, for sliding-window layers


class TorchAttentionBackend(AttentionBackend):
    def prepare(self, batch: ForwardBatch) -> None:
        groups: list[_ExtendGroup | _DecodeGroup] = []
        ne = batch.num_extend
        if ne > 0:
            groups.append(self._extend_group(batch, 0, ne, 0))
        if ne < batch.batch_size:
            start = int(batch.extend_lens[:ne].sum()) if ne else 0
            groups.append(self._decode_group(batch, ne, batch.batch_size, start))
        batch.attn_metadata = groups

    def _extend_group(self, batch: ForwardBatch, lo: int, hi: int, token_start: int) -> _ExtendGroup:
        extend_lens = batch.extend_lens[lo:hi]
        prefix_lens = batch.prefix_lens[lo:hi]
        seq_lens = batch.seq_lens[lo:hi]
        max_q = int(extend_lens.max())
        max_k = int(seq_lens.max())
        starts = torch.cumsum(extend_lens, 0) - extend_lens
        offs = torch.arange(max_q, device=seq_lens.device)[None, :]
        valid = offs < extend_lens[:, None]
        q_index = torch.where(valid, starts[:, None] + offs + token_start, 0)
        rows = torch.arange(hi - lo, device=seq_lens.device)[:, None] * max_q + offs
        flat_pos = rows[valid]
        return _ExtendGroup(token_start, int(extend_lens.sum()), q_index, flat_pos,
                            batch.page_table[lo:hi, :max_k], prefix_lens, extend_lens)

    def _decode_group(self, batch: ForwardBatch, lo: int, hi: int, token_start: int) -> _DecodeGroup:
        pad = self.kv_pool.pad_slot
        seq = batch.seq_lens[lo:hi]
        table = batch.page_table[lo:hi, :int(seq.max())]
        n, width = table.shape
        dev = seq.device
        positions = torch.arange(width, device=dev)

        # Runs of consecutive requests sharing at least MIN_SHARED_PREFIX leading slots; a request's
        # newest slot is never shared.
        runs: list[tuple[list[int], int]] = []
        if n > 1:
            limit = torch.minimum(seq[1:], seq[:-1]) - 1
            same = (table[1:] == table[:-1]) & (positions[None, :] < limit[:, None])
            common = same.to(torch.int32).cumprod(dim=1).sum(dim=1).tolist()
            members, shared = [0], width
            for b in range(1, n):
                if common[b - 1] >= MIN_SHARED_PREFIX:
                    members.append(b)
                    shared = min(shared, common[b - 1])
                    continue
                if len(members) > 1:
                    runs.append((members, shared))
                members, shared = [b], width
            if len(members) > 1:
                runs.append((members, shared))

        start = torch.zeros(n, dtype=torch.int64, device=dev)
        if runs:
            max_m = max(len(m) for m, _ in runs)
            max_p = max(p for _, p in runs)
            member_index = torch.zeros(len(runs), max_m, dtype=torch.int64, device=dev)
            shared_lens = torch.tensor([p for _, p in runs], device=dev)
            member_rows, member_flat = [], []
            for g, (members, p) in enumerate(runs):
                member_index[g, :len(members)] = torch.tensor(members, device=dev)
                member_rows += members
                member_flat += [g * max_m + j for j in range(len(members))]
                start[members] = p
            firsts = torch.tensor([m[0] for m, _ in runs], device=dev)
            prefix_mask = positions[None, :max_p] < shared_lens[:, None]
            prefix_table = table[firsts, :max_p].masked_fill(~prefix_mask, pad)
            # Every row in equal groups, in order (a GRPO batch): the kernel needs no member indices then.
            every_row = len(member_rows) == n and all(len(m) == max_m for m, _ in runs)
            member_rows_t = None if every_row else torch.tensor(member_rows, device=dev)
            member_flat_t = None if every_row else torch.tensor(member_flat, device=dev)
        else:
            member_index = torch.zeros(0, 1, dtype=torch.int64, device=dev)
            prefix_table = torch.zeros(0, 1, dtype=torch.int64, device=dev)
            prefix_mask = torch.zeros(0, 1, dtype=torch.bool, device=dev)
            member_rows_t = member_flat_t = torch.zeros(0, dtype=torch.int64, device=dev)

        suffix_len = int((seq - start).max())
        idx = start[:, None] + torch.arange(suffix_len, device=dev)[None, :]
        suffix_mask = idx < seq[:, None]
        suffix_table = table.gather(1, idx.clamp(max=width - 1)).masked_fill(~suffix_mask, pad)
        # A mask with no False in it (one request, or equal lengths) is left out: the kernel then skips
        # building and adding a bias of zeros in every layer, with the same result.
        cascade = dict(prefix_table=prefix_table, prefix_mask=None if bool(prefix_mask.all()) else prefix_mask,
                       member_index=member_index, member_rows=member_rows_t, member_flat=member_flat_t,
                       suffix_table=suffix_table, suffix_mask=None if bool(suffix_mask.all()) else suffix_mask)
        return _DecodeGroup(token_start, n, width, cascade, self._extend_group(batch, lo, hi, token_start))

    def forward(self, q, k, v, layer_id, batch, scale, sliding_window=None):
        k_cache = self.kv_pool.k_buffers[layer_id]
        v_cache = self.kv_pool.v_buffers[layer_id]
        store_kv_torch(k_cache, v_cache, batch.out_slots, k, v)
        out = torch.empty_like(q)
        for g in batch.attn_metadata:
            rows = slice(g.token_start, g.token_start + g.num_tokens)
            if isinstance(g, _DecodeGroup):
                if sliding_window is None or g.max_seq_len <= sliding_window:
                    out[rows] = cascade_decode_attention_torch(q[rows], k_cache, v_cache, scale=scale, **g.cascade)
                    continue
                g = g.fallback
            q_pad = q[g.q_index]  # [B, Lq, H, D]
            o = paged_attention_torch(q_pad, k_cache, v_cache, g.page_table, g.mask(sliding_window), scale)
            out[rows] = o.reshape(-1, *o.shape[2:])[g.flat_pos]
        return out
