"""`record_prompt_logprobs`: the logprobs of a request's prompt tokens, from the logits rows that a step
computed at its prompt positions (runtime/batch_builder.py's `lp_rows`), appended chunk by chunk."""

from __future__ import annotations

import torch

from runtime.batch_builder import BatchEntry
from runtime.logprob_entries import logprob_entries, processed_logprobs


def record_prompt_logprobs(entries: list[BatchEntry], logits: torch.Tensor,
                           lp_rows: dict[int, tuple[int, int]]) -> None:
    """For each entry in `lp_rows` (first logits row, first prompt position), append its prompt
    positions' logprobs to its request; done once the whole prompt has been computed."""
    for i, (row0, pos0) in lp_rows.items():
        req = entries[i].req
        prompt_len = len(req.input_ids)
        end = min(req.kv_len, prompt_len)
        if pos0 == req.logprob_start_len:  # the first reported position has no context: null
            req.input_token_logprobs.append(None)
            req.input_top_logprobs.append(None)
            req.input_token_ids_logprobs.append(None)
        # Row for position p predicts token p + 1; the last prompt position predicts no prompt token.
        last_pos = min(end, prompt_len - 1)
        if last_pos > pos0:
            rows = logits[row0:row0 + last_pos - pos0]
            targets = torch.tensor(req.input_ids[pos0 + 1:last_pos + 1], device=logits.device)
            lp = processed_logprobs(rows, req.sampling_params.temperature)
            chosen, top, by_id = logprob_entries(lp, targets, req.top_logprobs_num, req.token_ids_logprob)
            req.input_token_logprobs.extend(chosen)
            if top is not None:
                req.input_top_logprobs.extend(top)
            if by_id is not None:
                req.input_token_ids_logprobs.extend(by_id)
        if end >= prompt_len:
            req.input_logprobs_pending = False
