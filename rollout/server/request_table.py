"""`RequestTable`: the samples in flight between the HTTP process and the engine, by rid: which call and
which sample of it each one is, and the queue limit (--max-queued-requests) over them."""

from __future__ import annotations

from dataclasses import dataclass

from rollout.server.engine_errors import QueueFull
from rollout.server.generate_call import GenerateCall
from rollout.server.metrics import RequestClock, ServerMetrics
from runtime.messages import RequestOutput


@dataclass(eq=False)
class InFlightSample:
    call: GenerateCall
    index: int
    abandoned: bool = False   # the client left; the entry stays until the engine confirms the abort
    clock: RequestClock | None = None   # with --enable-metrics, for requests that log metrics


class RequestTable:
    def __init__(self, max_queued: int | None):
        self.max_queued = max_queued
        self._samples: dict[str, InFlightSample] = {}

    def __len__(self) -> int:
        return len(self._samples)

    def rids(self) -> list[str]:
        return list(self._samples)

    def admit(self, count: int) -> None:
        """QueueFull when `count` more samples would pass --max-queued-requests (waiting + running)."""
        if self.max_queued is None:
            return
        if count > self.max_queued:
            raise ValueError(f"The call asks for {count} samples, more than this server ever queues "
                             f"(--max-queued-requests {self.max_queued}); split it.")
        if len(self._samples) + count > self.max_queued:
            raise QueueFull(f"The server is full: {len(self._samples)} samples are waiting or running and the "
                            f"call adds {count}, over --max-queued-requests {self.max_queued}. Retry later.")

    def check_new(self, rids: list[str]) -> None:
        """ValueError for an rid already in flight."""
        for rid in rids:
            if rid in self._samples:
                raise ValueError(f"Duplicate request ID rid={rid!r}: a request with it is still running.")

    def add(self, call: GenerateCall, clocks: list[RequestClock | None]) -> None:
        for i, (rid, clock) in enumerate(zip(call.rids, clocks)):
            self._samples[rid] = InFlightSample(call, i, clock=clock)

    def apply(self, out: RequestOutput, metrics: ServerMetrics | None) -> None:
        """Feed an engine output to its call (dropped when its rid is no longer in flight)."""
        sample = self._samples.get(out.rid)
        if sample is None:
            return
        if sample.clock is not None:
            metrics.on_output(sample.clock, len(out.new_token_ids), out.finished, out.prompt_tokens,
                              out.cached_tokens)
        if out.finished:
            del self._samples[out.rid]
        sample.call.on_output(sample.index, out, sample.abandoned)

    def abandon(self, call: GenerateCall) -> list[str]:
        """Mark the call's samples still in flight as abandoned (their outputs are dropped); their rids."""
        rids = [rid for rid in call.rids if (s := self._samples.get(rid)) is not None and s.call is call]
        for rid in rids:
            self._samples[rid].abandoned = True
        return rids

    def fail_all(self, reason: str) -> None:
        """The engine is gone: every call in flight ends with the reason."""
        for sample in list(self._samples.values()):
            sample.call.fail(reason)
        self._samples.clear()
