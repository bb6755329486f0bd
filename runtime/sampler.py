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
from runtime.logit_penalties import apply_penalties
from runtime.logprob_entries import LogprobList, batch_logprob_entries, logprob_entries, processed_logprobs
from runtime.sampling_params import SamplingParams
from runtime.seeded_uniform import as_int64, seeded_uniform
from runtime.token_support import AllowedTokens

# processed_logprobs, logprob_entries and seeded_uniform live in their own files; imported from here too.
__all__ = [
    "SampleOutput",
    "Sampler",
    "SamplerRow",
    "logprob_entries",
    "processed_logprobs",
    "seeded_uniform",
]


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
            chosen, tops, ids = batch_logprob_entries(
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
            apply_penalties(x, rows, plan.penalized)

    def _draw(self, scaled: torch.Tensor, rows: Sequence[SamplerRow]) -> torch.Tensor:
        """One token per row from softmax(scaled) truncated by top-k / top-p / min-p."""
        device = scaled.device
        vocab = scaled.shape[1]
        probs = torch.softmax(scaled, dim=-1)
        u = seeded_uniform(
            long_tensor([as_int64(int(r.seed)) for r in rows], device),
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
