"""The reference of token drawing, and the CPU path: one token per row from probabilities truncated by
top-k / top-p / min-p, by inverse CDF at a given uniform number u. kernels/sampling.py dispatches to
it or to the Triton kernel (kernels/triton/sampling.py), which reproduces this arithmetic (CDF_BLOCK
is shared from here, so both depend on this module and not on each other).
"""

from __future__ import annotations

import torch

from kernels.row_select import long_tensor, put_rows, row_index, take_rows

# Inverse-CDF sampling sums probabilities in blocks of this many tokens, so the float64 scan runs
# over V / CDF_BLOCK block sums plus one block instead of converting the whole row to float64
# (which costs more than the softmax itself on a CPU).
CDF_BLOCK = 256
# First guess of how many of the most probable tokens a top-p cut needs; rows whose cut lies
# further out are retried with 8x more candidates, so a full-vocabulary sort (very slow on a CPU)
# is only paid for nearly flat distributions.
TOP_P_PROBE = 256


def draw_tokens_torch(probs: torch.Tensor, u: torch.Tensor, top_k: list[int], top_p: list[float],
                      min_p: list[float]) -> torch.Tensor:
    """The reference (and the CPU path): one token per row of probs [n, V] (fp32, softmaxed; this
    function may write into it), by inverse CDF at u [n] (float64 in (0, 1)) over the row truncated
    by top_k (V: off), top_p (1.0: off) and min_p (0.0: off)."""
    device = probs.device
    n, vocab = probs.shape
    truncates = [top_k[i] < vocab or top_p[i] < 1.0 for i in range(n)]
    cut = [i for i in range(n) if truncates[i]]
    free = [i for i in range(n) if not truncates[i]]

    tokens = torch.empty(n, dtype=torch.int64, device=device)
    if free:
        f = row_index(free, n, device)
        sub = take_rows(probs, f)  # probs is ours, so masking it in place is fine
        floors = [min_p[i] for i in free]
        if any(m > 0.0 for m in floors):
            floor = torch.tensor(floors, dtype=torch.float32, device=device) * sub.amax(dim=-1)
            sub.masked_fill_(sub < floor[:, None], 0.0)
        put_rows(tokens, f, _inverse_cdf(sub, take_rows(u, f)))
    if cut:
        c = row_index(cut, n, device)
        picked = _draw_truncated(
            take_rows(probs, c),
            [top_k[i] for i in cut],
            [top_p[i] for i in cut],
            [min_p[i] for i in cut],
            take_rows(u, c),
        )
        put_rows(tokens, c, picked)
    return tokens


def _draw_truncated(
    probs: torch.Tensor, top_k: list[int], top_p: list[float], min_p: list[float], u: torch.Tensor
) -> torch.Tensor:
    """Draw from the n most probable tokens of each row, n = min(top_k, the smallest count whose
    cumulative prob reaches top_p), both counted on the untruncated probs; then min_p.

    torch.topk gives the candidates, so the full-vocabulary sort (very slow on a CPU) is only paid
    when a top-p cut lies beyond TOP_P_PROBE * 8**i candidates. Only the sorted values decide n,
    so topk (whose order among equal values is unspecified) gives the same n as a stable sort. The
    kept tokens are then put in id order before the inverse CDF, which makes the draw the same as
    a masked vocabulary-order draw and independent of how many candidates this batch fetched.
    """
    rows, vocab = probs.shape
    device = probs.device
    k_all = long_tensor(top_k, device)
    # top_p = 1 disables the cut; +inf makes every candidate pass the comparison below.
    p_all = torch.tensor([p if p < 1.0 else float("inf") for p in top_p], dtype=torch.float64, device=device)
    m_all = torch.tensor(min_p, dtype=torch.float32, device=device)
    tokens = torch.empty(rows, dtype=torch.int64, device=device)

    pending = list(range(rows))
    width = min(vocab, max(min(k, TOP_P_PROBE) if p < 1.0 else k for k, p in zip(top_k, top_p)))
    while pending:
        idx = row_index(pending, rows, device)
        # One look-ahead candidate shows whether the next token ties with the last kept one.
        cand = min(vocab, width + 1)
        vals, ids = torch.topk(take_rows(probs, idx), cand, dim=-1)
        cum = torch.cumsum(vals, dim=-1, dtype=torch.float64)
        n_p = ((cum - vals.double()) < take_rows(p_all, idx)[:, None]).sum(dim=-1)
        n = torch.minimum(n_p, take_rows(k_all, idx))
        located = (n < cand) | (cand == vocab)
        last = vals.gather(1, (n - 1)[:, None]).squeeze(1)
        nxt = vals.gather(1, n.clamp(max=cand - 1)[:, None]).squeeze(1)
        straddles = (n < cand) & (nxt == last)
        floor = take_rows(m_all, idx) * vals[:, 0]

        keep = (torch.arange(cand, device=device) < n[:, None]) & (vals >= floor[:, None])
        # Kept ids first, in id order; dropped ones sort after them with a key past the vocabulary.
        key, order = torch.where(keep, ids, vocab).sort(dim=-1)
        weights = torch.where(key < vocab, vals.gather(1, order), 0.0)
        pick = _inverse_cdf_exact(weights, take_rows(u, idx))
        put_rows(tokens, idx, key.gather(1, pick[:, None]).squeeze(1))

        still: list[int] = []
        ties: list[int] = []
        for j, (row, done, tie) in enumerate(zip(pending, located.tolist(), straddles.tolist())):
            if not done:
                still.append(row)
            elif tie:
                ties.append(j)
        if ties:
            # Equal probs straddle the cut, and topk may have fetched any of them: redo these rows
            # over the whole vocabulary, keeping the lowest ids among the ties (a stable sort's
            # choice).
            need = n - (vals > last[:, None]).sum(dim=-1)
            for j in ties:
                row = pending[j]
                p = probs[row]
                level = p == last[j]
                kept = (p > last[j]) | (level & (level.cumsum(0) <= need[j]))
                w = torch.where(kept & (p >= floor[j]), p, 0.0)
                tokens[row] = _inverse_cdf(w[None], u[row : row + 1])[0]
        pending = still
        width = min(vocab, width * 8)
    return tokens


def _inverse_cdf_exact(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index per row where the float64 running sum of weights first exceeds u * total."""
    cdf = torch.cumsum(weights, dim=-1, dtype=torch.float64)
    total = cdf[:, -1]
    target = torch.minimum(u * total, _below(total))
    return torch.searchsorted(cdf, target[:, None], right=True).squeeze(1).clamp_(max=weights.shape[1] - 1)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token index per row such that the cumulative (unnormalised) prob first exceeds u * total.

    Two levels: fp32 sums of CDF_BLOCK-token blocks scanned in float64 pick the block, then a
    float64 scan inside that block picks the token. A zero-prob token is never returned.
    """
    rows, vocab = probs.shape
    device = probs.device
    full = vocab // CDF_BLOCK
    parts = []
    if full:
        parts.append(probs[:, : full * CDF_BLOCK].reshape(rows, full, CDF_BLOCK).sum(dim=-1))
    if vocab % CDF_BLOCK:
        parts.append(probs[:, full * CDF_BLOCK :].sum(dim=-1, keepdim=True))
    block = torch.cat(parts, dim=1).double()
    cdf = torch.cumsum(block, dim=-1)
    total = cdf[:, -1]
    target = torch.minimum(u * total, _below(total))
    b = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)
    mass = block.gather(1, b[:, None]).squeeze(1)
    start = cdf.gather(1, b[:, None]).squeeze(1) - mass
    local_u = ((target - start) / mass).clamp_(0.0, 1.0)

    cols = b[:, None] * CDF_BLOCK + torch.arange(CDF_BLOCK, device=device)
    inside = cols < vocab
    w = probs.gather(1, cols.clamp(max=vocab - 1)).double() * inside
    local = torch.cumsum(w, dim=-1)
    local_total = local[:, -1]
    local_target = torch.minimum(local_u * local_total, _below(local_total))
    j = torch.searchsorted(local, local_target[:, None], right=True).squeeze(1).clamp_(max=CDF_BLOCK - 1)
    return (b * CDF_BLOCK + j).clamp_(max=vocab - 1)


def _below(total: torch.Tensor) -> torch.Tensor:
    """The largest float64 under total: a search target strictly below the running sum's end
    lands on an entry with positive weight, whatever u rounds to."""
    return torch.nextafter(total, torch.zeros_like(total))
