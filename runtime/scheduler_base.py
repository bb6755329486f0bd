"""What both schedulers share (runtime/scheduler.py for decoder models, runtime/encoder_scheduler.py for
bidirectional encoders): the runner, the request table, generation-control state, one table from message
type to handler, aborts (by rid prefix or by exact rids), the answer to a request that cannot run, and the
server's health and live-state queries. Weight updates and generation control go to runtime/controller.py.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections import deque
from typing import Any, Callable

from runtime.controller import Controller
from runtime.messages import (AbortRequest, AbortRequestsExact, EmbedRequest, FlushCacheRequest, FlushCacheResult,
                              GenerateRequest, HealthCheckRequest, HealthCheckResult, RequestOutput,
                              ServerStateRequest, ServerStateResult)

ABORTED_BY_CLIENT = "Aborted by the client."


class SchedulerBase(ABC):
    def __init__(self, runner: Any):
        self.runner = runner
        self.args = runner.args
        self.weight_version: str = runner.args.weight_version
        self.requests: dict[str, Any] = {}
        self.waiting: deque = deque()
        self.running: list = []
        self.forward_steps = 0
        # Generation control (runtime/controller.py): a pause mode, released memory, or why the weights
        # cannot serve (a broken update). While paused or released, requests queue and wait.
        self.paused: str | None = None
        self.memory_released = False
        self.unusable: str | None = None
        self.failed: str | None = None  # the scheduler loop hit a bug (runtime/scheduler_loop.py): nothing runs
        self.controller = Controller(self)
        self._handlers: dict[type, Callable[[Any], list]] = {
            GenerateRequest: lambda m: self._accept(m, self.add_request),
            EmbedRequest: lambda m: self._accept(m, self.add_embed_request),
            AbortRequest: lambda m: self.abort(m.rid, m.abort_all),
            AbortRequestsExact: lambda m: self.abort(rids=m.rids, message=m.message),
            FlushCacheRequest: lambda m: [self.flush_cache()],
            HealthCheckRequest: lambda m: [HealthCheckResult(id=m.id, error=self.failed)],
            ServerStateRequest: lambda m: [ServerStateResult(id=m.id, state=self.state())],
            **dict.fromkeys(self.controller.message_types(), self.controller.handle),
        }

    # --- messages -------------------------------------------------------------------------------

    def handle(self, msg: Any) -> list:
        """Apply one message; returns what it answers (outputs of aborted or refused requests, results)."""
        handler = self._handlers.get(type(msg))
        if handler is None:
            raise TypeError(f"Unknown scheduler message {type(msg).__name__}")
        return handler(msg)

    def _accept(self, msg: GenerateRequest | EmbedRequest, add: Callable[[Any], None]) -> list[RequestOutput]:
        if self.failed is not None:
            return [self._refused(msg, self.failed, 500)]
        if self.unusable is not None:  # the front ends refuse first (503); this one raced an update breaking
            return [self._refused(msg, self.unusable, 503)]
        try:
            add(msg)
        except ValueError as e:  # a duplicate rid, generation on an encoder: the front ends check first,
            return [self._refused(msg, str(e))]  # but a client must never wait for an answer that never comes
        return []

    def _refused(self, msg: GenerateRequest | EmbedRequest, message: str,
                 status_code: int | None = None) -> RequestOutput:
        return RequestOutput(rid=msg.rid, new_token_ids=[], prompt_tokens=len(msg.input_ids), cached_tokens=0,
                             weight_version=self.weight_version, finished=True,
                             finish_reason=abort_reason(message, status_code))

    def abort(self, rid: str = "", abort_all: bool = False, message: str = ABORTED_BY_CLIENT, *,
              rids: list[str] | None = None, status_code: int | None = None) -> list[RequestOutput]:
        """Abort requests whose rid starts with `rid` (or all, or exactly those in `rids`); each ends with
        finish type abort and answers with its partial output. `status_code` (as SGLang's abort finish
        reason carries it): the front end answers the request's call with that HTTP status instead."""
        if rids is None:
            rids = [r for r in self.requests if abort_all or r.startswith(rid)]
        outputs = []
        for r in rids:
            req = self.requests.get(r)  # gone: finished already, or named twice
            if req is None:
                continue
            req.finish_reason = abort_reason(message, status_code)
            self._finish(req)
            outputs.append(self._output(req))
        return outputs

    def base_state(self) -> dict:
        """The live-state keys that mean the same for every scheduler."""
        return {
            "num_running_reqs": len(self.running),
            "num_waiting_reqs": len(self.waiting),
            "num_waiting_tokens": sum(len(r.input_ids) for r in self.waiting),  # /get_load counts them
            "num_engine_reqs": len(self.requests),
            "forward_steps": self.forward_steps,
            "weight_version": self.weight_version,
            "paused": self.paused,
            "weights_unusable": self.unusable,
            "failed": self.failed,
            "memory_released": self.memory_released,
            "num_weight_updates": self.controller.num_updates,
            "weight_update_seconds": round(self.controller.update_seconds, 6),
            "engine_pid": os.getpid(),
        }

    # --- what each scheduler provides ------------------------------------------------------------

    @abstractmethod
    def add_request(self, msg: GenerateRequest) -> None:
        """Queue a request; ValueError if it cannot run (a duplicate rid, ...)."""

    @abstractmethod
    def add_embed_request(self, msg: EmbedRequest) -> None: ...

    @abstractmethod
    def flush_cache(self) -> FlushCacheResult: ...

    @abstractmethod
    def has_work(self) -> bool: ...

    @abstractmethod
    def step(self) -> list[RequestOutput]:
        """Run one forward pass; return what requests produced."""

    @abstractmethod
    def state(self) -> dict:
        """Live state for /server_info-style queries: load, memory, cache, weights."""

    @property
    @abstractmethod
    def max_total_num_tokens(self) -> int:
        """Tokens the engine holds at once: the KV pool, or an encoder's per-step budget."""

    @abstractmethod
    def is_idle_clean(self) -> bool:
        """No request left and nothing leaked (for tests and the live state)."""

    # For runtime/controller.py: what happens to computed state around weight updates and memory release.

    @abstractmethod
    def invalidate_kv(self) -> None:
        """New weights: nothing computed under the old ones may be reused."""

    @abstractmethod
    def retract_all(self) -> None:
        """Free the KV of every running request and queue them again, in order."""

    @abstractmethod
    def release_kv_memory(self) -> bool:
        """Free the KV pool's memory (no request holds KV); False if there is none to free."""

    @abstractmethod
    def resume_kv_memory(self) -> None: ...

    @abstractmethod
    def _finish(self, req: Any) -> None:
        """Remove a finished (or aborted) request from the queues and free what it holds."""

    @abstractmethod
    def _output(self, req: Any) -> RequestOutput:
        """The request's output since the last one sent."""


def abort_reason(message: str, status_code: int | None) -> dict:
    reason: dict = {"type": "abort", "message": message}
    if status_code is not None:
        reason["status_code"] = status_code
    return reason
