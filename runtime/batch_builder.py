"""One scheduler step's batch: each scheduled request's share (`BatchEntry`) laid out as a ForwardBatch,
with which logits rows sample a token and which hold prompt-logprob positions.

Extends (prompt chunks) come first, decodes (one token each) last; the decode group's positions and
output slots are gathered at once from the request rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from runtime.cache_manager import CacheManager
from runtime.forward_batch import ForwardBatch
from runtime.request import Request


@dataclass
class BatchEntry:
    """A request's tokens in this step: positions [kv_start, kv_start + extend_len)."""

    req: Request
    extend_len: int
    kv_start: int


class StepBatch(NamedTuple):
    batch: ForwardBatch
    sample_rows: dict[int, int]                 # entry index -> logits row that samples its next token
    lp_rows: dict[int, tuple[int, int]]         # entry index -> (first logits row, first prompt position)


def build_batch(entries: list[BatchEntry], cache_manager: CacheManager, device: torch.device) -> StepBatch:
    """The ForwardBatch, plus which logits row samples each request and which rows hold its
    prompt-logprob positions (first row, first position)."""
    ids: list[int] = []
    positions: list[torch.Tensor] = []
    out_slots: list[torch.Tensor] = []
    logits_indices: list[int] = []
    sample_rows: dict[int, int] = {}
    lp_rows: dict[int, tuple[int, int]] = {}
    num_extend = max((i + 1 for i, s in enumerate(entries) if s.extend_len > 1), default=0)
    t = 0
    for i, s in enumerate(entries):
        req, n, start = s.req, s.extend_len, s.kv_start
        prompt_len = len(req.input_ids)
        if n == 1:  # decode: avoid building the whole fill list
            ids.append(req.input_ids[start] if start < prompt_len else req.output_ids[start - prompt_len])
        else:
            ids.extend(req.fill_ids[start:start + n])
        end = start + n
        fill_len = prompt_len + len(req.output_ids)
        if req.input_logprobs_pending:
            lo = max(req.logprob_start_len, start)
            hi = min(end, prompt_len)
            if lo < hi:
                lp_rows[i] = (len(logits_indices), lo)
                logits_indices.extend(range(t + lo - start, t + hi - start))
        if end == fill_len:
            last_row = t + n - 1
            if logits_indices and logits_indices[-1] == last_row:
                sample_rows[i] = len(logits_indices) - 1
            else:
                sample_rows[i] = len(logits_indices)
                logits_indices.append(last_row)
        t += n
    host = torch.device("cpu")  # built on the host, moved to the device once below
    rows = torch.tensor([s.req.req_pool_row for s in entries], device=host)
    prefix_lens = torch.tensor([s.kv_start for s in entries], device=host)
    extend_lens = torch.tensor([s.extend_len for s in entries], device=host)
    seq_lens = prefix_lens + extend_lens
    for s in entries[:num_extend]:
        positions.append(torch.arange(s.kv_start, s.kv_start + s.extend_len, device=host))
        out_slots.append(cache_manager.slots(s.req, s.kv_start, s.kv_start + s.extend_len))
    if num_extend < len(entries):
        dec_rows, dec_pos = rows[num_extend:], prefix_lens[num_extend:]
        positions.append(dec_pos)
        out_slots.append(cache_manager.slots_at(dec_rows, dec_pos))
    batch = ForwardBatch(
        input_ids=torch.tensor(ids, device=device),
        positions=torch.cat(positions).to(device),
        out_slots=torch.cat(out_slots).to(device),
        prefix_lens=prefix_lens.to(device),
        extend_lens=extend_lens.to(device),
        seq_lens=seq_lens.to(device),
        page_table=cache_manager.page_table(rows.to(device), int(seq_lens.max())),
        num_extend=num_extend,
        logits_indices=torch.tensor(logits_indices, dtype=torch.int64, device=device),
    )
    return StepBatch(batch, sample_rows, lp_rows)
