"""`ControlChannel`: control messages to the engine (health, state, weight updates, flush) and the
futures that wait for their answers.

Control messages share the request queue, so the engine answers them in order among requests: each
result comes back by its message's id, except flush results, which come one per FlushCacheRequest, in
order.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from typing import Any, Callable, Sequence

from rollout.server.engine_errors import EngineUnavailable
from runtime.messages import (ControlResult, FlushCacheRequest, FlushCacheResult, HealthCheckRequest,
                              HealthCheckResult, ServerStateRequest, ServerStateResult)

IdAnswer = HealthCheckResult | ServerStateResult | ControlResult
# Questions about the engine, as opposed to work for it.
PROBES = (HealthCheckRequest, ServerStateRequest)


class ControlChannel:
    def __init__(self, send: Callable[[list, Sequence[Any]], None]):
        self._send = send
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._flush_waiters: deque[asyncio.Future] = deque()
        self._work_deadlines: dict[int, float] = {}  # in-flight work (updates, pause, ...): when its wait ends

    def next_id(self) -> int:
        """A fresh number, unique in this process (message ids, health-check rids)."""
        return next(self._ids)

    async def request(self, message_cls: type, timeout: float, /, attachments: Sequence[Any] = (),
                      **fields: Any) -> Any:
        """Send `message_cls(id=..., **fields)` (and its `attachments`, see EngineLink.send); its answer, or
        EngineUnavailable after `timeout` s."""
        msg_id = self.next_id()
        fut = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        if message_cls not in PROBES:
            self._work_deadlines[msg_id] = time.monotonic() + timeout
        self._send([message_cls(id=msg_id, **fields)], attachments)
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise EngineUnavailable(f"The engine did not answer within {timeout:g} s.") from None
        finally:
            self._pending.pop(msg_id, None)
            self._work_deadlines.pop(msg_id, None)

    def working(self) -> bool:
        """True while the engine holds work we sent (a weight update, a pause, ...) that is still within the
        time its caller waits for it: the engine is busy on our behalf, not stuck."""
        now = time.monotonic()
        return any(now < deadline for deadline in self._work_deadlines.values())

    async def flush_once(self, timeout: float) -> FlushCacheResult:
        """One FlushCacheRequest; its result (not a success while requests run)."""
        fut = asyncio.get_running_loop().create_future()
        self._flush_waiters.append(fut)
        self._send([FlushCacheRequest()], ())
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise EngineUnavailable("The engine did not answer the flush request.") from None

    def resolve(self, out: IdAnswer) -> None:
        fut = self._pending.pop(out.id, None)
        if fut is not None and not fut.done():
            fut.set_result(out)

    def resolve_flush(self, out: FlushCacheResult) -> None:
        # One result per FlushCacheRequest, in order: the oldest waiter's, even if it gave up.
        if self._flush_waiters:
            fut = self._flush_waiters.popleft()
            if not fut.done():
                fut.set_result(out)

    def fail_all(self, reason: str) -> None:
        """The engine is gone: every waiter raises EngineUnavailable(reason)."""
        for fut in list(self._pending.values()) + list(self._flush_waiters):
            if not fut.done():
                fut.set_exception(EngineUnavailable(reason))
        self._pending.clear()
        self._flush_waiters.clear()
