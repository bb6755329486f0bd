"""`GenerateCall`: one /generate (or scoring) call in the HTTP process: a builder per sample in answer
order, one asyncio event, and what the client has not seen yet.

The engine client's receive loop feeds each sample's outputs in (`on_output`) and wakes the call: at every
step for a stream, once every sample is finished otherwise. The route then reads the answer (`results`)
or the chunks (`chunks`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from rollout.server.engine_errors import ClientDisconnected, EngineRequestFailed, EngineUnavailable
from rollout.server.incremental_stream import IncrementalStream
from runtime.messages import RequestOutput


@dataclass(eq=False)
class GenerateCall:
    """One call: its samples' builders (ResponseBuilders, or anything with the same req / add / finished /
    to_dict, like runtime/scoring_output.py's ScoringCollector) and its progress."""

    builders: list[Any]
    is_batch: bool
    stream: bool
    event: asyncio.Event = field(default_factory=asyncio.Event)
    remaining: int = 0
    dirty: list[int] = field(default_factory=list)   # indices updated since the last chunk (stream)
    error: str | None = None                         # set when the engine died under the call
    failure: tuple[int, str] | None = None           # (HTTP status, reason): a sample ended with a 5xx abort
    disconnected: bool = False                       # set when the client went away

    @property
    def rids(self) -> list[str]:
        return [b.req.rid for b in self.builders]

    @property
    def finished(self) -> bool:
        return self.remaining == 0

    # --- fed by the engine client ---------------------------------------------------------------

    def on_output(self, index: int, out: RequestOutput, abandoned: bool) -> None:
        """Apply sample `index`'s delta (not to an abandoned sample's builder) and wake the reader."""
        if not abandoned:
            self.builders[index].add(out)
        status = (out.finish_reason or {}).get("status_code") if out.finished else None
        if isinstance(status, int) and status >= 500 and self.failure is None:
            self.failure = (status, str(out.finish_reason.get("message", "")))
        if out.finished:
            self.remaining -= 1
        if self.stream:
            self.dirty.append(index)
            self.event.set()
        elif self.remaining == 0:
            self.event.set()

    def fail(self, reason: str) -> None:
        """The engine died under the call: its reader raises EngineUnavailable(reason)."""
        self.error = reason
        self.event.set()

    def disconnect(self) -> None:
        """The client went away: its reader raises ClientDisconnected."""
        self.disconnected = True
        self.event.set()

    # --- read by the route ----------------------------------------------------------------------

    async def next_event(self) -> None:
        """Wait until the engine sent something for the call; raise if it died or the client left."""
        await self.event.wait()
        self.event.clear()
        if self.error is not None:
            raise EngineUnavailable(self.error)
        if self.disconnected:
            raise ClientDisconnected()

    async def results(self) -> list[dict]:
        """Every sample's final answer, in order (non-streaming); EngineRequestFailed when a sample ended
        with a 5xx abort (the weights became unusable, the scheduler failed)."""
        while not self.finished:
            await self.next_event()
        if self.failure is not None:
            raise EngineRequestFailed(self.failure[1], self.failure[0])
        return [b.to_dict() for b in self.builders]

    async def chunks(self, incremental: bool) -> AsyncIterator[dict]:
        """Cumulative chunks: one per sample that changed since the last chunk, as the engine steps.

        Several steps' outputs that arrive before the client reads are coalesced into one chunk. With
        `incremental` (--incremental-streaming-output) a chunk carries only what is new since the sample's
        previous chunk."""
        deltas = IncrementalStream() if incremental else None
        while True:
            await self.next_event()
            if self.failure is not None:
                raise EngineRequestFailed(self.failure[1], self.failure[0])
            dirty, self.dirty = self.dirty, []
            seen: set[int] = set()
            for i in dirty:
                if i in seen:
                    continue
                seen.add(i)
                chunk = self.builders[i].to_dict()
                if deltas is not None:
                    chunk = deltas.delta(i, chunk, self.builders[i].finished)
                if self.is_batch:
                    chunk["index"] = i
                yield chunk
            if self.finished and not self.dirty:
                return
