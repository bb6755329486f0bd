"""Picks the next token of every running request and reports its logprobs.

One call of `Sampler.sample` handles one decode step of the whole batch. The order of work on each
row's fp32 logits is fixed by API.md, because RL trainers recompute these logprobs and must get the
same numbers:

1. logit_bias, then the eos / stop-token masks (min_new_tokens, ignore_eos), then
   repetition_penalty (HF, prompt and output tokens), frequency_penalty and presence_penalty
   (OpenAI, output tokens only). The result is the "processed" logits.
2. Logprobs are log_softmax(processed / T), T = 1 for greedy rows: the distribution actually sampled
   from, before top-k / top-p / min-p truncation.
3. Greedy rows take the argmax; other rows draw from softmax(processed / T) truncated by top-k,
   top-p and min-p, by inverse CDF with a uniform number that depends only on (seed, step).

Batch invariance: every tensor op below works row by row, the random number of a row is a hash of
its own seed and position, and each row's path through the code depends only on its own
parameters, so a row gets the same token whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

from runtime.sampling_params import GREEDY_TEMPERATURE, SamplingParams

__all__ = [
    "SampleOutput",
    "Sampler",
    "SamplerRow",
    "logprob_entries",
    "processed_logprobs",
    "seeded_uniform",
]

LogprobList = list[tuple[float, int]]

# Inverse-CDF sampling sums probabilities in blocks of this many tokens, so the float64 scan runs
# over V / _CDF_BLOCK block sums plus one block instead of converting the whole row to float64
# (which costs more than the softmax itself on a CPU).
_CDF_BLOCK = 256
# First guess of how many of the most probable tokens a top-p cut needs; rows whose cut lies
# further out are retried with 8x more candidates, so a full-vocabulary sort (very slow on a CPU)
# is only paid for nearly flat distributions.
_TOP_P_PROBE = 256


# ----------------------------------------------------------------------------------------------
# Counter-based random numbers (splitmix64 in int64 tensor arithmetic)
# ----------------------------------------------------------------------------------------------

_U64 = (1 << 64) - 1


def _as_int64(value: int) -> int:
    """Reinterpret the low 64 bits of a Python int as a signed int64 (what a torch.long holds)."""
    value &= _U64
    return value - (1 << 64) if value >= (1 << 63) else value


_GOLDEN = _as_int64(0x9E3779B97F4A7C15)
_MIX_A = _as_int64(0xBF58476D1CE4E5B9)
_MIX_B = _as_int64(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; splitmix64 needs the logical shift of the unsigned value.
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    # int64 multiplication wraps modulo 2**64, which is exactly the uint64 arithmetic splitmix wants.
    z = (z ^ _shift_right(z, 30)) * _MIX_A
    z = (z ^ _shift_right(z, 27)) * _MIX_B
    return z ^ _shift_right(z, 31)


def seeded_uniform(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One float64 in the open interval (0, 1) per (seed, step) pair, int64 inputs of equal shape.

    The seed is hashed before the step is added so that seeds s and s + k * golden do not walk the
    same sequence shifted by k steps. 52 random bits keep u strictly below 1 in float64.
    """
    key = _mix64(seeds + _GOLDEN)
    bits = _mix64(key + (steps + 1) * _GOLDEN)
    return (_shift_right(bits, 12).to(torch.float64) + 0.5) * (2.0**-52)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


class SamplerRow(Protocol):
    """What the sampler reads from a request; the scheduler's Request satisfies it."""

    sampling_params: SamplingParams
    input_ids: list[int]
    output_ids: list[int]
    seed: int


@dataclass
class SampleOutput:
    next_token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[LogprobList | None]
    token_ids_logprobs: list[LogprobList | None]


def processed_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) in fp32, T = 1 for greedy; the distribution the sampler draws from."""
    x = logits.float()
    if temperature >= GREEDY_TEMPERATURE and temperature != 1.0:
        x = x / temperature
    return torch.log_softmax(x, dim=-1)


def logprob_entries(
    logprobs: torch.Tensor,
    token_ids: torch.Tensor,
    top_logprobs_num: int,
    token_ids_logprob: list[int] | None,
) -> tuple[list[float], list[LogprobList] | None, list[LogprobList] | None]:
    """Per-row logprob of `token_ids`, and optionally the top-k and the requested-id entries.

    `logprobs` is [N, V] of already log-softmaxed rows (prompt positions of one request).
    """
    n = logprobs.shape[0]
    chosen, top, by_id = _entries(
        logprobs, token_ids.to(logprobs.device).view(-1), [top_logprobs_num] * n, [token_ids_logprob] * n
    )
    return (
        chosen,
        top if top_logprobs_num > 0 else None,
        by_id if token_ids_logprob is not None else None,
    )


@dataclass
class _RowPlan:
    """The per-row parameters of one step, gathered in a single pass over the requests."""

    temperature: list[float] = field(default_factory=list)
    sampled: list[int] = field(default_factory=list)
    greedy: list[int] = field(default_factory=list)
    # Edits to the logits before penalties: (row, token, value) triples.
    bias_rows: list[int] = field(default_factory=list)
    bias_tokens: list[int] = field(default_factory=list)
    bias_values: list[float] = field(default_factory=list)
    mask_rows: list[int] = field(default_factory=list)
    mask_tokens: list[int] = field(default_factory=list)
    penalized: list[int] = field(default_factory=list)


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: set[int]) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)

    def sample(
        self,
        logits: torch.Tensor,
        rows: Sequence[SamplerRow],
        return_logprob: Sequence[bool],
        top_logprobs_num: Sequence[int],
        token_ids_logprob: Sequence[list[int] | None],
    ) -> SampleOutput:
        batch = len(rows)
        if logits.dim() != 2 or logits.shape[0] != batch or logits.shape[1] < self.vocab_size:
            raise ValueError(
                f"logits must be [{batch}, >= {self.vocab_size}], got {tuple(logits.shape)}."
            )
        device = logits.device
        # Columns past vocab_size are padding of the LM head; they must never be drawn.
        x = logits[:, : self.vocab_size]
        owned = x.dtype != torch.float32
        x = x.float().contiguous()

        plan = self._plan(rows)
        if plan.bias_rows or plan.mask_rows or plan.penalized:
            if not owned:
                x = x.clone()  # never write into the caller's logits
            self._edit_logits(x, rows, plan)

        scaled = x
        if any(t != 1.0 for t in plan.temperature):
            temps = torch.tensor(plan.temperature, dtype=torch.float32, device=device)
            # Division, not multiplication by 1/T, so the numbers are those of log_softmax(l / T).
            scaled = x / temps[:, None]

        next_ids = torch.empty(batch, dtype=torch.int64, device=device)
        if plan.greedy:
            g = _index(plan.greedy, batch, device)
            _put_rows(next_ids, g, _take_rows(x, g).argmax(dim=-1))
        if plan.sampled:
            s = _index(plan.sampled, batch, device)
            _put_rows(next_ids, s, self._draw(_take_rows(scaled, s), [rows[i] for i in plan.sampled]))

        wants = [
            i
            for i in range(batch)
            if return_logprob[i] or top_logprobs_num[i] > 0 or token_ids_logprob[i] is not None
        ]
        logprobs: list[float | None] = [None] * batch
        top: list[LogprobList | None] = [None] * batch
        by_id: list[LogprobList | None] = [None] * batch
        if wants:
            w = _index(wants, batch, device)
            lsm = torch.log_softmax(_take_rows(scaled, w), dim=-1)
            chosen, tops, ids = _entries(
                lsm,
                next_ids[w],
                [top_logprobs_num[i] for i in wants],
                [token_ids_logprob[i] for i in wants],
            )
            for j, i in enumerate(wants):
                if return_logprob[i]:
                    logprobs[i] = chosen[j]
                if top_logprobs_num[i] > 0:
                    top[i] = tops[j]
                if token_ids_logprob[i] is not None:
                    by_id[i] = ids[j]
        return SampleOutput(next_ids.tolist(), logprobs, top, by_id)

    # ------------------------------------------------------------------------------------------

    def _plan(self, rows: Sequence[SamplerRow]) -> _RowPlan:
        plan = _RowPlan()
        for i, row in enumerate(rows):
            sp = row.sampling_params
            if sp.is_greedy:
                plan.greedy.append(i)
                plan.temperature.append(1.0)
            else:
                plan.sampled.append(i)
                plan.temperature.append(float(sp.temperature))
            for tok, bias in sp.logit_bias.items():
                plan.bias_rows.append(i)
                plan.bias_tokens.append(int(tok))
                plan.bias_values.append(float(bias))
            masked: set[int] = set()
            if len(row.output_ids) < sp.min_new_tokens:
                masked.update(self.eos_token_ids)
                masked.update(sp.stop_token_ids)
            if sp.ignore_eos:
                masked.update(self.eos_token_ids)
            for tok in masked:
                if 0 <= tok < self.vocab_size:
                    plan.mask_rows.append(i)
                    plan.mask_tokens.append(tok)
            if sp.repetition_penalty != 1.0 or sp.frequency_penalty != 0.0 or sp.presence_penalty != 0.0:
                plan.penalized.append(i)
        return plan

    def _edit_logits(self, x: torch.Tensor, rows: Sequence[SamplerRow], plan: _RowPlan) -> None:
        """Bias, masks and penalties, in place on the fp32 logits, in the order API.md fixes."""
        device = x.device
        if plan.bias_rows:
            x.index_put_(
                (_long(plan.bias_rows, device), _long(plan.bias_tokens, device)),
                torch.tensor(plan.bias_values, dtype=torch.float32, device=device),
                accumulate=True,
            )
        if plan.mask_rows:
            x[_long(plan.mask_rows, device), _long(plan.mask_tokens, device)] = float("-inf")
        if plan.penalized:
            p = _index(plan.penalized, x.shape[0], device)
            if p is None:
                _apply_penalties(x, rows)
            else:
                sub = x.index_select(0, p)
                _apply_penalties(sub, [rows[i] for i in plan.penalized])
                x.index_copy_(0, p, sub)

    def _draw(self, scaled: torch.Tensor, rows: Sequence[SamplerRow]) -> torch.Tensor:
        """One token per row from softmax(scaled) truncated by top-k / top-p / min-p."""
        device = scaled.device
        vocab = scaled.shape[1]
        probs = torch.softmax(scaled, dim=-1)

        top_k = [sp.top_k if 0 < sp.top_k < vocab else vocab for sp in (r.sampling_params for r in rows)]
        top_p = [float(r.sampling_params.top_p) for r in rows]
        min_p = [float(r.sampling_params.min_p) for r in rows]
        cut = [i for i in range(len(rows)) if top_k[i] < vocab or top_p[i] < 1.0]
        if cut or any(m > 0.0 for m in min_p):
            # A token survives when its prob reaches its row's threshold; rows without any
            # truncation keep threshold 0, which drops nothing.
            threshold = torch.zeros(len(rows), dtype=torch.float32, device=device)
            if cut:
                c = _index(cut, len(rows), device)
                kth, tie_rows = _top_k_top_p_cutoff(
                    _take_rows(probs, c), [top_k[i] for i in cut], [top_p[i] for i in cut]
                )
                _put_rows(threshold, c, kth)
            if any(m > 0.0 for m in min_p):
                min_p_t = torch.tensor(min_p, dtype=torch.float32, device=device)
                threshold = torch.maximum(threshold, min_p_t * probs.amax(dim=-1))
            probs = probs.masked_fill_(probs < threshold[:, None], 0.0)
            if cut and tie_rows:
                # Equal probs straddle the top-k/top-p cut: keep only the lowest ids among them,
                # as a stable descending sort would.
                for j, need in tie_rows:
                    row = probs[cut[j]]
                    ties = row == kth[j]
                    row.masked_fill_(ties & (ties.cumsum(0) > need), 0.0)

        seeds = _long([_as_int64(int(r.seed)) for r in rows], device)
        steps = _long([len(r.output_ids) for r in rows], device)
        return _inverse_cdf(probs, seeded_uniform(seeds, steps))


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _long(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


def _index(rows: list[int], batch: int, device: torch.device) -> torch.Tensor | None:
    """Row indices as a tensor, or None when they are all rows in order (no gather needed)."""
    if len(rows) == batch:
        return None
    return _long(rows, device)


def _take_rows(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    return x if index is None else x.index_select(0, index)


def _put_rows(dst: torch.Tensor, index: torch.Tensor | None, src: torch.Tensor) -> None:
    if index is None:
        dst.copy_(src)
    else:
        dst.index_copy_(0, index, src)


def _apply_penalties(x: torch.Tensor, rows: Sequence[SamplerRow]) -> None:
    """HF repetition penalty over prompt + output, then OpenAI frequency and presence penalties."""
    n, vocab = x.shape
    device = x.device
    # Counts over a flat [n * vocab] view; ids outside the vocabulary (none expected) are dropped.
    out_rows: list[int] = []
    out_ids: list[int] = []
    seen_rows: list[int] = []
    seen_ids: list[int] = []
    for i, row in enumerate(rows):
        sp = row.sampling_params
        if sp.repetition_penalty != 1.0:
            ids = row.input_ids + row.output_ids
            seen_rows.extend([i] * len(ids))
            seen_ids.extend(ids)
        if sp.frequency_penalty != 0.0 or sp.presence_penalty != 0.0:
            out_rows.extend([i] * len(row.output_ids))
            out_ids.extend(row.output_ids)

    if seen_ids:
        flat = _flat_positions(seen_rows, seen_ids, vocab, device)
        seen = torch.zeros(n * vocab, dtype=torch.bool, device=device)
        seen[flat] = True
        penalty = torch.tensor(
            [r.sampling_params.repetition_penalty for r in rows], dtype=torch.float32, device=device
        )[:, None]
        penalized = torch.where(x < 0, x * penalty, x / penalty)
        torch.where(seen.view(n, vocab), penalized, x, out=x)

    if out_ids:
        flat = _flat_positions(out_rows, out_ids, vocab, device)
        counts = torch.zeros(n * vocab, dtype=torch.float32, device=device)
        counts.index_add_(0, flat, torch.ones(flat.shape[0], dtype=torch.float32, device=device))
        counts = counts.view(n, vocab)
        freq = torch.tensor(
            [r.sampling_params.frequency_penalty for r in rows], dtype=torch.float32, device=device
        )
        presence = torch.tensor(
            [r.sampling_params.presence_penalty for r in rows], dtype=torch.float32, device=device
        )
        # Two separate subtractions, as the semantics are written, so fp32 rounding matches a
        # reference that applies them one after the other.
        x.sub_(freq[:, None] * counts)
        x.sub_(presence[:, None] * (counts > 0).float())


def _flat_positions(row_ids: list[int], token_ids: list[int], vocab: int, device: torch.device) -> torch.Tensor:
    r = _long(row_ids, device)
    t = _long(token_ids, device)
    ok = (t >= 0) & (t < vocab)
    return (r * vocab + t)[ok]


def _top_k_top_p_cutoff(
    probs: torch.Tensor, top_k: list[int], top_p: list[float]
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Per row, the prob of the last token kept by top-k and top-p, and the rows where equal probs
    straddle that cut (with how many of the tied tokens to keep).

    The kept set is the n most probable tokens, n = min(top_k, smallest count whose cumulative
    prob reaches top_p), computed on the untruncated probs. Only the sorted values decide n, so
    torch.topk (whose order among ties is unspecified) gives the same n as a stable sort.
    """
    rows, vocab = probs.shape
    device = probs.device
    k_all = _long(top_k, device)
    # top_p = 1 disables the cut; +inf makes every candidate pass the comparison below.
    p_all = torch.tensor([p if p < 1.0 else float("inf") for p in top_p], dtype=torch.float64, device=device)
    kth = torch.empty(rows, dtype=torch.float32, device=device)
    need = torch.empty(rows, dtype=torch.int64, device=device)
    straddles = torch.zeros(rows, dtype=torch.bool, device=device)

    pending = list(range(rows))
    width = min(vocab, max(min(k, _TOP_P_PROBE) if p < 1.0 else k for k, p in zip(top_k, top_p)))
    while pending:
        idx = _long(pending, device)
        # One look-ahead candidate shows whether the next token ties with the last kept one.
        cand = min(vocab, width + 1)
        vals = torch.topk(probs.index_select(0, idx), cand, dim=-1).values
        cum = torch.cumsum(vals, dim=-1, dtype=torch.float64)
        n_p = ((cum - vals.double()) < p_all[idx, None]).sum(dim=-1)
        k = k_all[idx]
        n = torch.minimum(n_p, k)
        located = (n < cand) | (cand == vocab)
        last = vals.gather(1, (n - 1)[:, None]).squeeze(1)
        n_above = (vals > last[:, None]).sum(dim=-1)
        nxt = vals.gather(1, n.clamp(max=cand - 1)[:, None]).squeeze(1)
        done = located.tolist()
        kth[idx] = last
        need[idx] = n - n_above
        straddles[idx] = (n < cand) & (nxt == last)
        pending = [r for r, d in zip(pending, done) if not d]
        width = min(vocab, width * 8)

    tie_rows = [(j, nd) for j, (s, nd) in enumerate(zip(straddles.tolist(), need.tolist())) if s]
    return kth, tie_rows


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token index per row such that the cumulative (unnormalised) prob first exceeds u * total.

    Two levels: fp32 sums of _CDF_BLOCK-token blocks scanned in float64 pick the block, then a
    float64 scan inside that block picks the token. A zero-prob token is never returned.
    """
    rows, vocab = probs.shape
    device = probs.device
    full = vocab // _CDF_BLOCK
    parts = []
    if full:
        parts.append(probs[:, : full * _CDF_BLOCK].reshape(rows, full, _CDF_BLOCK).sum(dim=-1))
    if vocab % _CDF_BLOCK:
        parts.append(probs[:, full * _CDF_BLOCK :].sum(dim=-1, keepdim=True))
    block = torch.cat(parts, dim=1).double()
    cdf = torch.cumsum(block, dim=-1)
    total = cdf[:, -1]
    # Strictly below the total, so the search lands on a block (and token) with positive mass.
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    b = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)
    mass = block.gather(1, b[:, None]).squeeze(1)
    start = cdf.gather(1, b[:, None]).squeeze(1) - mass
    local_u = ((target - start) / mass).clamp_(0.0, 1.0)

    cols = b[:, None] * _CDF_BLOCK + torch.arange(_CDF_BLOCK, device=device)
    inside = cols < vocab
    w = probs.gather(1, cols.clamp(max=vocab - 1)).double() * inside
    local = torch.cumsum(w, dim=-1)
    local_total = local[:, -1]
    local_target = torch.minimum(local_u * local_total, torch.nextafter(local_total, torch.zeros_like(local_total)))
    j = torch.searchsorted(local, local_target[:, None], right=True).squeeze(1).clamp_(max=_CDF_BLOCK - 1)
    return (b * _CDF_BLOCK + j).clamp_(max=vocab - 1)


def _entries(
    lsm: torch.Tensor,
    chosen_ids: torch.Tensor,
    top_nums: list[int],
    id_lists: list[list[int] | None],
) -> tuple[list[float], list[LogprobList], list[LogprobList]]:
    """Chosen logprob, top-k (logprob, id) and requested-id (logprob, id) entries of each row."""
    n, vocab = lsm.shape
    device = lsm.device
    chosen = lsm.gather(1, chosen_ids.view(-1, 1)).squeeze(1).tolist()

    tops: list[LogprobList] = [[] for _ in range(n)]
    k_max = min(vocab, max(top_nums, default=0))
    if k_max > 0:
        with_top = [i for i in range(n) if top_nums[i] > 0]
        t = _index(with_top, n, device)
        vals, ids = torch.topk(_take_rows(lsm, t), k_max, dim=-1)
        vals_l, ids_l = vals.tolist(), ids.tolist()
        for j, i in enumerate(with_top):
            k = min(top_nums[i], vocab)
            tops[i] = list(zip(vals_l[j][:k], ids_l[j][:k]))

    by_id: list[LogprobList] = [[] for _ in range(n)]
    flat_rows = [i for i, ids in enumerate(id_lists) if ids for _ in ids]
    if flat_rows:
        flat_ids = [t for ids in id_lists if ids for t in ids]
        vals_l = lsm[_long(flat_rows, device), _long(flat_ids, device)].tolist()
        pos = 0
        for i, ids in enumerate(id_lists):
            if ids:
                by_id[i] = list(zip(vals_l[pos : pos + len(ids)], ids))
                pos += len(ids)
    return chosen, tops, by_id
