"""Logprobs as API.md reports them: `processed_logprobs` (the distribution sampled from) and the
chosen / top-k / requested-id entries of log-softmaxed rows (`logprob_entries` for one request's prompt
positions, `batch_logprob_entries` for a step's rows)."""

from __future__ import annotations

import torch

from kernels.row_select import long_tensor, row_index, take_rows
from runtime.sampling_params import GREEDY_TEMPERATURE

LogprobList = list[tuple[float, int]]


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
    chosen, top, by_id = batch_logprob_entries(
        logprobs, token_ids.to(logprobs.device).view(-1), [top_logprobs_num] * n, [token_ids_logprob] * n
    )
    return (
        chosen,
        top if top_logprobs_num > 0 else None,
        by_id if token_ids_logprob is not None else None,
    )


def batch_logprob_entries(
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
