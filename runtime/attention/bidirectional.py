"""Non-causal attention over packed sequences (encoders such as BERT): no KV cache, no padding in the
linear layers. Per step the packed tokens are laid out once as a padded [B, L] grid; each layer gathers
q/k/v into it, runs SDPA with a key-padding mask, and scatters the real rows back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PackedLayout:
    seq_lens: torch.Tensor      # [B]
    starts: torch.Tensor        # [B] first flat row of each sequence
    grid_index: torch.Tensor    # [B, L] flat row of each grid cell (pads point at row 0)
    key_mask: torch.Tensor      # [B, 1, 1, L] True for real keys
    flat_pos: torch.Tensor      # [T] where each real token sits in the flattened [B * L] grid
    seq_ids: torch.Tensor       # [T] which sequence each token belongs to

    @classmethod
    def build(cls, seq_lens: list[int], device: torch.device) -> "PackedLayout":
        lens = torch.tensor(seq_lens, dtype=torch.int64, device=device)
        starts = torch.cumsum(lens, 0) - lens
        width = int(lens.max())
        offs = torch.arange(width, device=device)[None, :]
        valid = offs < lens[:, None]
        grid_index = torch.where(valid, starts[:, None] + offs, 0)
        flat_pos = (torch.arange(len(seq_lens), device=device)[:, None] * width + offs)[valid]
        seq_ids = torch.repeat_interleave(torch.arange(len(seq_lens), device=device), lens)
        return cls(lens, starts, grid_index, valid[:, None, None, :], flat_pos, seq_ids)

    def mean(self, h: torch.Tensor) -> torch.Tensor:
        """Per-sequence mean of token rows h [T, D] -> [B, D] (sentence-transformers' mean pooling)."""
        sums = torch.zeros(len(self.seq_lens), h.shape[1], dtype=h.dtype, device=h.device).index_add_(0, self.seq_ids, h)
        return sums / self.seq_lens[:, None].to(h.dtype)


def bidirectional_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout,
                            scale: float) -> torch.Tensor:
    """q, k, v: [T, H, D] packed; every token attends to every real token of its own sequence."""
    qg, kg, vg = (x[layout.grid_index].transpose(1, 2) for x in (q, k, v))  # [B, H, L, D]
    o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=layout.key_mask, scale=scale)
    o = o.transpose(1, 2).reshape(-1, q.shape[1], q.shape[2])  # [B * L, H, D]
    return o[layout.flat_pos]
