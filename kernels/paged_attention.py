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


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [N, Hkv, R, D] (R query rows per kv head), k/v: [N, Hkv, L, D] (any strides), key_mask: [N, L]
    or None.

    Returns the attention output [N, Hkv, R, D] and the log-sum-exp of the scores [N, Hkv, R], so two
    attentions over disjoint key sets can be merged exactly (merge_attention). On CPU this is torch's
    fused flash kernel, which returns the log-sum-exp it computes anyway and reads strided K/V: about
    3x faster than the unfused reference below, with no copy of the gathered keys."""
    if q.device.type != "cpu":
        return attention_with_lse_reference(q, k, v, key_mask, scale)
    bias = None
    if key_mask is not None:
        bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device)
        bias.masked_fill_(~key_mask, float("-inf"))
        bias = bias[:, None, None, :]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=bias, scale=scale)
    return out, lse


def attention_with_lse_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 key_mask: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfused attention_with_lse: the definition the fused kernel is tested against."""
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if key_mask is not None:
        scores.masked_fill_(~key_mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = scores.sub_(lse.unsqueeze(-1)).exp_()
    return torch.matmul(probs, v), lse


def merge_attention(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """Attention over keys A ∪ B from the attentions over A and over B (outputs [..., D], lse [...])."""
    m = torch.maximum(lse1, lse2)
    w1 = torch.exp(lse1 - m).unsqueeze(-1)
    w2 = torch.exp(lse2 - m).unsqueeze(-1)
    return (o1 * w1 + o2 * w2) / (w1 + w2)


def cascade_decode_attention_torch(
    q: torch.Tensor,               # [B, H, D] one query per request
    k_cache: torch.Tensor, v_cache: torch.Tensor,   # [S, Hkv, D]
    prefix_table: torch.Tensor,    # [G, P] slots of each group's shared prefix, padded
    prefix_mask: torch.Tensor | None,  # [G, P] bool; None: every key valid
    member_index: torch.Tensor,    # [G, M] decode row of each group member, padded with 0
    member_rows: torch.Tensor | None,  # [K] decode rows that belong to a group; None: every row, in
    member_flat: torch.Tensor | None,  # groups of M in order (GRPO). [K] their place in the [G*M] layout
    suffix_table: torch.Tensor,    # [B, Ls] slots of each request's keys after its group's prefix
    suffix_mask: torch.Tensor | None,  # [B, Ls] bool; None: every key valid
    scale: float,
) -> torch.Tensor:                 # [B, H, D]
    """Decode attention where groups of requests share a prefix (the n samples of one prompt): the
    prefix's keys are read once per group and attended by all members' queries in one matmul, then
    merged with each request's attention over its own suffix."""
    b, h, d = q.shape
    hkv = k_cache.shape[1]
    g = h // hkv
    qs = q.view(b, hkv, g, d)
    ks = gather_pages(k_cache, suffix_table).transpose(1, 2)             # [B, Hkv, Ls, D], strided
    vs = gather_pages(v_cache, suffix_table).transpose(1, 2)
    out, lse = attention_with_lse(qs, ks, vs, suffix_mask, scale)      # [B, Hkv, G, D], [B, Hkv, G]
    every_row = member_rows is None   # then the member gathers and scatters below are identities: skipped
    if not every_row and member_rows.numel() == 0:
        return out.reshape(b, h, d)
    n_groups, m = member_index.shape
    qp = qs.view(n_groups, m, hkv, g, d) if every_row else qs[member_index]   # [NG, M, Hkv, G, D]
    qp = qp.permute(0, 2, 1, 3, 4).reshape(n_groups, hkv, m * g, d)
    kp = gather_pages(k_cache, prefix_table).transpose(1, 2)
    vp = gather_pages(v_cache, prefix_table).transpose(1, 2)
    op, lp = attention_with_lse(qp, kp, vp, prefix_mask, scale)        # [NG, Hkv, M*G, D]
    op = op.view(n_groups, hkv, m, g, d).permute(0, 2, 1, 3, 4).reshape(n_groups * m, hkv, g, d)
    lp = lp.view(n_groups, hkv, m, g).permute(0, 2, 1, 3).reshape(n_groups * m, hkv, g)
    # .to: on CPU the fused kernel returns an fp32 log-sum-exp, which promotes an fp16/bf16 merge.
    if every_row:
        return merge_attention(op, lp, out, lse).to(out.dtype).reshape(b, h, d)
    out[member_rows] = merge_attention(op[member_flat], lp[member_flat], out[member_rows], lse[member_rows]).to(out.dtype)
    return out.reshape(b, h, d)
