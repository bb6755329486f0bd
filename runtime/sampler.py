"""Picks the next token of every running request and reports its logprobs.

One call of `Sampler.sample` handles one decode step of the whole batch. The order of work on each
row's fp32 logits is fixed by API.md, because RL trainers recompute these logprobs and must get the
same numbers:

1. logit_bias, then the eos / stop-token mask while min_new_tokens is not reached, then
   repetition_penalty (HF, prompt and output tokens), frequency_penalty and presence_penalty
   (OpenAI, output tokens only). The result is the "processed" logits.
2. Logprobs are log_softmax(processed / T), T = 1 for greedy rows: the distribution actually sampled
   from, before top-k / top-p / min-p truncation.
3. Greedy rows take the argmax; other rows draw from softmax(processed / T) truncated by top-k,
   top-p and min-p, by inverse CDF with a uniform number that depends only on (seed, step).

ignore_eos only stops the scheduler from ending a request at EOS (as in SGLang and vLLM); it does not
mask EOS, so logprobs stay those of the trainer's model.

Batch invariance: every tensor op below works row by row, the random number of a row is a hash of
its own seed and position, and each row's path through the code depends only on its own
parameters, so a row gets the same token whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

from kernels.row_select import long_tensor, put_rows, row_index, take_rows
from kernels.sampling import draw_tokens
from kernels.sampling_support import truncation_support
from runtime.sampling_params import GREEDY_TEMPERATURE, SamplingParams
from runtime.token_support import AllowedTokens

__all__ = [
    "SampleOutput",
    "Sampler",
    "SamplerRow",
    "logprob_entries",
    "processed_logprobs",
    "seeded_uniform",
]

LogprobList = list[tuple[float, int]]

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
    # Per row when asked (`want_support`): the ids the row could have drawn, most probable first; None
    # for a row whose distribution was not truncated at all (every token of the vocabulary).
    sampling_masks: list[list[int] | None] = field(default_factory=list)


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
        allowed: AllowedTokens | None = None,
        want_support: Sequence[bool] | None = None,
    ) -> SampleOutput:
        """`allowed`: a grammar's next-token sets for some rows, applied after the penalties (so the
        logprobs are those of the masked distribution); `want_support`: rows that report their support."""
        batch = len(rows)
        if logits.dim() != 2 or logits.shape[0] != batch or logits.shape[1] < self.vocab_size:
            raise ValueError(
                f"logits must be [{batch}, >= {self.vocab_size}], got {tuple(logits.shape)}."
            )
        device = logits.device
        # Columns past vocab_size are padding of the LM head; they must never be drawn.
        x = logits[:, : self.vocab_size]
        owned = x.dtype != torch.float32 or not x.is_contiguous()  # then x below is a copy
        x = x.float().contiguous()

        plan = self._plan(rows)
        if plan.bias_rows or plan.mask_rows or plan.penalized:
            if not owned:
                x = x.clone()  # never write into the caller's logits
                owned = True
            self._edit_logits(x, rows, plan)
        if allowed is not None:
            if not owned:
                x = x.clone()
                owned = True
            allowed.apply(x)

        scaled = x
        if any(t != 1.0 for t in plan.temperature):
            temps = torch.tensor(plan.temperature, dtype=torch.float32, device=device)
            # Division, not multiplication by 1/T, so the numbers are those of log_softmax(l / T).
            # Greedy rows divide by 1, which leaves them exact, so x can be scaled in place when
            # it is already a private copy.
            scaled = x.div_(temps[:, None]) if owned else x / temps[:, None]

        next_ids = torch.empty(batch, dtype=torch.int64, device=device)
        if plan.greedy:
            g = row_index(plan.greedy, batch, device)
            put_rows(next_ids, g, take_rows(x, g).argmax(dim=-1))
        if plan.sampled:
            s = row_index(plan.sampled, batch, device)
            put_rows(next_ids, s, self._draw(take_rows(scaled, s), [rows[i] for i in plan.sampled]))

        wants = [
            i
            for i in range(batch)
            if return_logprob[i] or top_logprobs_num[i] > 0 or token_ids_logprob[i] is not None
        ]
        logprobs: list[float | None] = [None] * batch
        top: list[LogprobList | None] = [None] * batch
        by_id: list[LogprobList | None] = [None] * batch
        if wants:
            w = row_index(wants, batch, device)
            lsm = torch.log_softmax(take_rows(scaled, w), dim=-1)
            chosen, tops, ids = _entries(
                lsm,
                take_rows(next_ids, w),
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
        out = SampleOutput(next_ids.tolist(), logprobs, top, by_id)
        if want_support is not None and any(want_support):
            out.sampling_masks = self._supports(scaled, rows, plan, out.next_token_ids, allowed, want_support)
        return out

    def _supports(self, scaled: torch.Tensor, rows: Sequence[SamplerRow], plan: _RowPlan, tokens: list[int],
                  allowed: AllowedTokens | None, want: Sequence[bool]) -> list[list[int] | None]:
        """The support each asking row drew from: its token alone for greedy rows; the truncation's
        kept set (within the grammar's allowed set) for the others; None when nothing was cut."""
        vocab = scaled.shape[1]
        constrained = set(allowed.rows) if allowed is not None else set()
        greedy = set(plan.greedy)
        masks: list[list[int] | None] = [None] * len(rows)
        for i, row in enumerate(rows):
            if not want[i]:
                continue
            if i in greedy:
                masks[i] = [tokens[i]]
                continue
            sp = row.sampling_params
            top_k = sp.top_k if 0 < sp.top_k < vocab else vocab
            if top_k == vocab and sp.top_p >= 1.0 and sp.min_p <= 0.0 and i not in constrained:
                continue
            probs = torch.softmax(scaled[i], dim=-1)  # the same numbers _draw computes for this row
            masks[i] = truncation_support(probs, top_k, float(sp.top_p), float(sp.min_p))
        return masks

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
                (long_tensor(plan.bias_rows, device), long_tensor(plan.bias_tokens, device)),
                torch.tensor(plan.bias_values, dtype=torch.float32, device=device),
                accumulate=True,
            )
        if plan.mask_rows:
            x[long_tensor(plan.mask_rows, device), long_tensor(plan.mask_tokens, device)] = float("-inf")
        if plan.penalized:
            _apply_penalties(x, rows, plan.penalized)

    def _draw(self, scaled: torch.Tensor, rows: Sequence[SamplerRow]) -> torch.Tensor:
        """One token per row from softmax(scaled) truncated by top-k / top-p / min-p."""
        device = scaled.device
        vocab = scaled.shape[1]
        probs = torch.softmax(scaled, dim=-1)
        u = seeded_uniform(
            long_tensor([_as_int64(int(r.seed)) for r in rows], device),
            long_tensor([len(r.output_ids) for r in rows], device),
        )
        params = [r.sampling_params for r in rows]
        return draw_tokens(
            probs,
            u,
            [sp.top_k if 0 < sp.top_k < vocab else vocab for sp in params],
            [float(sp.top_p) for sp in params],
            [float(sp.min_p) for sp in params],
        )


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _token_positions(
    x: torch.Tensor, row_numbers: list[int], id_lists: list[list[int]]
) -> torch.Tensor:
    """Flat positions row * vocab + token in x for every listed token, out-of-vocab ids dropped."""
    vocab = x.shape[1]
    device = x.device
    lengths = long_tensor([len(ids) for ids in id_lists], device)
    owner = torch.repeat_interleave(long_tensor(row_numbers, device), lengths)
    tokens = long_tensor([t for ids in id_lists for t in ids], device)
    ok = (tokens >= 0) & (tokens < vocab)
    return (owner * vocab + tokens)[ok]


def _apply_penalties(x: torch.Tensor, rows: Sequence[SamplerRow], penalized: list[int]) -> None:
    """HF repetition penalty over prompt + output, then OpenAI frequency and presence penalties.

    Only the logits of tokens that occur are read and written, so the cost follows the context
    length rather than batch x vocabulary. A token listed twice is read and written twice with
    the same value, which is cheaper than deduplicating (torch.unique sorts).
    """
    device = x.device
    vocab = x.shape[1]
    flat = x.view(-1)

    rep = [i for i in penalized if rows[i].sampling_params.repetition_penalty != 1.0]
    if rep:
        pos = _token_positions(x, rep, [rows[i].input_ids + rows[i].output_ids for i in rep])
        factor = _per_row(x, rep, [rows[i].sampling_params.repetition_penalty for i in rep])[pos // vocab]
        vals = flat[pos]
        flat[pos] = torch.where(vals < 0, vals * factor, vals / factor)

    occ = [
        i
        for i in penalized
        if rows[i].sampling_params.frequency_penalty != 0.0 or rows[i].sampling_params.presence_penalty != 0.0
    ]
    if occ:
        pos = _token_positions(x, occ, [rows[i].output_ids for i in occ])
        ones = torch.ones(pos.shape[0], dtype=torch.float32, device=device)
        counts = torch.zeros_like(flat).index_put_((pos,), ones, accumulate=True)
        owner = pos // vocab
        freq = _per_row(x, occ, [rows[i].sampling_params.frequency_penalty for i in occ])[owner]
        presence = _per_row(x, occ, [rows[i].sampling_params.presence_penalty for i in occ])[owner]
        # Two separate subtractions, as the semantics are written, so fp32 rounding matches a
        # reference that applies them one after the other.
        vals = flat[pos] - freq * counts[pos]
        flat[pos] = vals - presence


def _per_row(x: torch.Tensor, row_numbers: list[int], values: list[float]) -> torch.Tensor:
    """A [rows of x] fp32 vector holding values at row_numbers (zero elsewhere, never read)."""
    out = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    out[long_tensor(row_numbers, x.device)] = torch.tensor(values, dtype=torch.float32, device=x.device)
    return out


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
        t = row_index(with_top, n, device)
        vals, ids = torch.topk(take_rows(lsm, t), k_max, dim=-1)
        vals_l, ids_l = vals.tolist(), ids.tolist()
        for j, i in enumerate(with_top):
            k = min(top_nums[i], vocab)
            tops[i] = list(zip(vals_l[j][:k], ids_l[j][:k]))

    by_id: list[LogprobList] = [[] for _ in range(n)]
    flat_rows = [i for i, ids in enumerate(id_lists) if ids for _ in ids]
    if flat_rows:
        flat_ids = [t for ids in id_lists if ids for t in ids]
        vals_l = lsm[long_tensor(flat_rows, device), long_tensor(flat_ids, device)].tolist()
        pos = 0
        for i, ids in enumerate(id_lists):
            if ids:
                by_id[i] = list(zip(vals_l[pos : pos + len(ids)], ids))
                pos += len(ids)
    return chosen, tops, by_id
