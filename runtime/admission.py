"""`Admission`: which prompt tokens run in a scheduler step: chunked prefills already under way first,
then waiting requests, longest cached prefix first, within the step's token budget, the running-request
cap, and a reserve of KV for the running requests' decodes.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any

from runtime.batch_builder import BatchEntry
from runtime.cache_manager import CacheManager
from runtime.request import Request, RequestStatus

# Longest-prefix-first ordering costs a tree match per waiting request; past this many, serve FCFS.
LPM_MAX_WAITING = 128
# A waiting request sharing at least this many uncached tokens with one admitted in the same step
# waits a step, so the shared prefix is computed once and then read from the cache (n > 1 groups).
IN_BATCH_SHARED_PREFIX = 32
# Admission keeps this fraction of running requests' remaining new tokens free for their decodes.
DECODE_RESERVE_RATIO = 0.3
DECODE_RESERVE_CLIP = 256


class Admission:
    def __init__(self, cache_manager: CacheManager, args: Any):
        self.cache_manager = cache_manager
        self.page_size: int = args.page_size
        self.step_tokens: int = args.prefill_step_tokens
        self.max_running: int = args.max_running_requests
        self.chunked_prefill: bool = args.chunked_prefill

    def schedule_extends(self, prefilling: list[Request], waiting: deque[Request],
                         running: list[Request]) -> list[BatchEntry]:
        """This step's prompt chunks: `prefilling`'s (running requests mid-prompt) first, then waiting
        requests, which move from `waiting` to `running` as they are admitted."""
        budget = self.step_tokens
        scheduled: list[BatchEntry] = []
        for req in prefilling:  # chunked prefills already under way go first
            if budget <= 0:
                break
            n = min(req.num_uncomputed, budget)
            if not self.cache_manager.extend(req, n):
                break
            scheduled.append(BatchEntry(req, n, req.kv_len))
            budget -= n
        if budget > 0 and waiting:
            scheduled += self._admit(budget, [s.req.fill_ids for s in scheduled], waiting, running)
        return scheduled

    def _usable_prefix(self, req: Request, matched: int) -> int:
        # At least one token must run to produce logits; prompt logprobs need their positions computed.
        limit = len(req.fill_ids) - 1
        if req.input_logprobs_pending:
            limit = min(limit, req.logprob_start_len)
        limit -= limit % self.page_size
        return min(matched, limit)

    def _decode_reserve(self, running: list[Request]) -> int:
        remaining = sum(min(r.sampling_params.max_new_tokens - len(r.output_ids), DECODE_RESERVE_CLIP)
                        for r in running)
        return int(remaining * DECODE_RESERVE_RATIO)

    def _admission_order(self, waiting: deque[Request]) -> list[Request]:
        if len(waiting) > LPM_MAX_WAITING:
            return list(waiting)
        # With prefix caching off every match is empty: first come, first served.
        matched = {id(r): self.cache_manager.match(r).slots.shape[0] for r in waiting}
        return sorted(waiting, key=lambda r: -matched[id(r)])  # stable: FCFS among equals

    def _admit(self, budget: int, prefilling_fills: list[list[int]], waiting: deque[Request],
               running: list[Request]) -> list[BatchEntry]:
        scheduled: list[BatchEntry] = []
        admitted_fills: list[list[int]] = list(prefilling_fills)
        reserve = self._decode_reserve(running)
        for req in self._admission_order(waiting):
            if budget <= 0 or len(running) >= self.max_running:
                break
            fill = req.fill_ids
            match = self.cache_manager.match(req)
            prefix = self._usable_prefix(req, match.slots.shape[0])
            if any(self._should_wait_for(req, fill, prefix, other) for other in admitted_fills):
                continue
            n = len(fill) - prefix
            if not self.chunked_prefill and n > budget:
                if scheduled or admitted_fills:  # no chunking: a prompt over the step's budget runs alone
                    break
                budget = n
            n = min(n, budget)
            if not self.cache_manager.admit(req, match, prefix, n, reserve):
                break
            if not req.admitted_once:
                req.cached_tokens = prefix
                req.admitted_once = True
            req.status = RequestStatus.RUNNING
            waiting.remove(req)
            running.append(req)
            scheduled.append(BatchEntry(req, n, prefix))
            admitted_fills.append(fill)
            budget -= n
        return scheduled

    def _should_wait_for(self, req: Request, fill: list[int], prefix: int, other: list[int]) -> bool:
        """Whether `req` should wait a step for `other` (being prefilled now) to put their common prefix
        in the cache: a long shared prefix, or any usable one of an identical prompt (n > 1 siblings)."""
        shared = self._usable_prefix(req, len(os.path.commonprefix([fill, other]))) - prefix
        return shared >= IN_BATCH_SHARED_PREFIX or (shared > 0 and other == fill)
