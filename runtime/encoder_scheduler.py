"""Batches EmbedRequests for a bidirectional encoder: whole sequences, packed, up to a token budget.

Same interface as runtime/scheduler.py's Scheduler (handle / step / abort / has_work), so the scheduler
loop, the in-process Engine and the server's engine process drive it unchanged. There is no KV and no
chunking: an encoder's token attends to later ones, so a sequence runs in one pass or not at all.
Weight updates, versions, pause / continue and weight reads go to runtime/controller.py's Controller, as
for the decoder scheduler; since nothing outlives a step, an update has no KV to invalidate, and every
output carries the version of the weights its single forward pass ran under.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from runtime.encoder_runner import EncoderRunner
from runtime.messages import EmbedRequest, FlushCacheResult, GenerateRequest, RequestOutput
from runtime.scheduler_base import SchedulerBase

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class EncoderRequest:
    rid: str
    input_ids: list[int]
    token_type_ids: list[int] | None
    finish_reason: dict | None = None
    embedding: list[float] | None = None


class EncoderScheduler(SchedulerBase):
    def __init__(self, runner: EncoderRunner):
        super().__init__(runner)  # `running` holds requests only during a step: nothing stays between steps
        # The budget is per step; a sequence longer than it still runs, alone.
        self.max_batch_tokens = runner.args.prefill_step_tokens

    def add_request(self, msg: GenerateRequest) -> None:
        raise ValueError(f"Request {msg.rid!r}: an encoder model cannot generate.")

    def add_embed_request(self, msg: EmbedRequest) -> None:
        if msg.rid in self.requests:
            raise ValueError(f"Duplicate request ID rid={msg.rid!r}: a request with it is still running.")
        req = EncoderRequest(msg.rid, list(msg.input_ids), msg.token_type_ids)
        self.requests[req.rid] = req
        self.waiting.append(req)

    def flush_cache(self) -> FlushCacheResult:  # nothing is cached
        if self.requests:
            return FlushCacheResult(success=False, message="Cache not flushed: there are running or waiting requests.")
        return FlushCacheResult(success=True, message="Cache flushed.")

    def has_work(self) -> bool:
        if self.paused is not None or self.memory_released:
            return False
        return bool(self.waiting)

    def step(self) -> list[RequestOutput]:
        stopped = self.controller.poll()  # weights left a mix by a dead trainer: nothing may run on them
        if stopped or self.unusable is not None:
            return stopped
        batch: list[EncoderRequest] = []
        tokens = 0
        while self.waiting and (not batch or tokens + len(self.waiting[0].input_ids) <= self.max_batch_tokens):
            req = self.waiting.popleft()
            batch.append(req)
            tokens += len(req.input_ids)
        self.running = batch
        try:
            pooled = self.runner.forward([r.input_ids for r in batch], [r.token_type_ids for r in batch])
        finally:
            self.running = []
        self.forward_steps += 1
        outputs = []
        for req, row in zip(batch, pooled.tolist()):
            req.embedding = row
            req.finish_reason = {"type": "length", "length": 0}
            self._finish(req)
            outputs.append(self._output(req))
        return outputs

    def _finish(self, req: EncoderRequest) -> None:
        if req in self.waiting:
            self.waiting.remove(req)
        self.requests.pop(req.rid, None)

    def _output(self, req: EncoderRequest) -> RequestOutput:
        return RequestOutput(rid=req.rid, new_token_ids=[], prompt_tokens=len(req.input_ids), cached_tokens=0,
                             weight_version=self.weight_version, finished=True, finish_reason=req.finish_reason,
                             embedding=req.embedding)

    # --- no KV: nothing computed under old weights survives a step, nothing to retract or release ---

    def invalidate_kv(self) -> None:
        pass

    def retract_all(self) -> None:
        pass

    def release_kv_memory(self) -> bool:
        return False

    def resume_kv_memory(self) -> None:
        pass

    # --- state ----------------------------------------------------------------------------------

    def is_idle_clean(self) -> bool:
        return not self.requests and not self.waiting and not self.running

    @property
    def max_total_num_tokens(self) -> int:
        return self.max_batch_tokens

    def state(self) -> dict:
        """The keys of the decoder scheduler's live state that mean something without a KV pool."""
        return {
            **self.base_state(),
            "max_total_num_tokens": self.max_batch_tokens,
            "kv_available_tokens": 0,
            "kv_used_tokens": 0,
            "cache_tokens": 0,
            "cache_evictable_tokens": 0,
            "cache_protected_tokens": 0,
            "token_usage": 0.0,
            "idle_clean": self.is_idle_clean(),
            "integrity_error": None,
            "num_retractions": 0,
        }
