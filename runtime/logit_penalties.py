"""`apply_penalties`: HF's repetition penalty and OpenAI's frequency and presence penalties, in place on
a batch's fp32 logits, reading and writing only the logits of tokens that occur."""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from kernels.row_select import long_tensor
from runtime.sampling_params import SamplingParams


class PenalizedRow(Protocol):
    """What the penalties read from a request (runtime/sampler.py's SamplerRow has it)."""

    sampling_params: SamplingParams
    input_ids: list[int]
    output_ids: list[int]


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


def apply_penalties(x: torch.Tensor, rows: Sequence[PenalizedRow], penalized: list[int]) -> None:
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
