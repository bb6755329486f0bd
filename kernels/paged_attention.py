"""Attention over a paged KV cache, torch reference.

The cache is one tensor per layer, [num_slots, kv_heads, head_dim]; a request's keys are the rows its
page table names. Both functions batch requests by padding to the longest one and masking, so there is
one matmul per step instead of one per request.
"""

import torch
import torch.nn.functional as F


def store_kv_torch(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                   k: torch.Tensor, v: torch.Tensor) -> None:
    k_cache[slots] = k
    v_cache[slots] = v


def gather_pages(cache: torch.Tensor, page_table: torch.Tensor) -> torch.Tensor:
    """cache[page_table] as [B, Lk, Hkv, D]; index_select on 2-D rows is several times faster on CPU
    than advanced indexing, and this gather is most of decode attention's cost."""
    b, lk = page_table.shape
    rows = cache.view(cache.shape[0], -1).index_select(0, page_table.reshape(-1))
    return rows.view(b, lk, *cache.shape[1:])


def paged_attention_torch(
    q: torch.Tensor,            # [B, Lq, H, D] queries, padded per request
    k_cache: torch.Tensor,      # [S, Hkv, D]
    v_cache: torch.Tensor,
    page_table: torch.Tensor,   # [B, Lk] slot of each key position, padded
    mask: torch.Tensor,         # [B, Lq, Lk] bool, True where a query may attend a key
    scale: float,
) -> torch.Tensor:              # [B, Lq, H, D]
    k = gather_pages(k_cache, page_table).transpose(1, 2)  # [B, Hkv, Lk, D]
    v = gather_pages(v_cache, page_table).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k, v, attn_mask=mask.unsqueeze(1), scale=scale,
        enable_gqa=q.shape[2] != k.shape[1],
    )
    return out.transpose(1, 2)


def attention_mask(prefix_lens: torch.Tensor, extend_lens: torch.Tensor, max_q: int, max_k: int,
                   sliding_window: int | None = None) -> torch.Tensor:
    """[B, max_q, max_k]: query i of request b sits at position prefix_lens[b] + i and sees keys up to it.

    Padded query rows see key 0 so softmax stays finite; their outputs are discarded.
    """
    q_pos = prefix_lens[:, None] + torch.arange(max_q, device=prefix_lens.device)[None, :]   # [B, Lq]
    k_pos = torch.arange(max_k, device=prefix_lens.device)[None, None, :]                     # [1, 1, Lk]
    mask = k_pos <= q_pos[:, :, None]
    if sliding_window is not None:
        mask &= k_pos > q_pos[:, :, None] - sliding_window
    valid_q = torch.arange(max_q, device=prefix_lens.device)[None, :] < extend_lens[:, None]
    mask &= valid_q[:, :, None]
    mask[:, :, 0] |= ~valid_q
    return mask
