"""`ControlChannel`: control messages to the engine (health, state, weight updates, flush) and the
futures that wait for their answers.

Control messages share the request queue, so the engine answers them in order among requests: each
result comes back by its message's id, except flush results, which come one per FlushCacheRequest, in
order.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from typing import Any, Callable

from rollout.server.engine_errors import EngineUnavailable
from runtime.messages import ControlResult, FlushCacheRequest, FlushCacheResult, HealthCheckResult, ServerStateResult

IdAnswer = HealthCheckResult | ServerStateResult | ControlResult


class ControlChannel:
    def __init__(self, send: Callable[[list], None]):
        self._send = send
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._flush_waiters: deque[asyncio.Future] = deque()

    def next_id(self) -> int:
        """A fresh number, unique in this process (message ids, health-check rids)."""
        return next(self._ids)

    async def request(self, message_cls: type, timeout: float, /, **fields: Any) -> Any:
        """Send `message_cls(id=..., **fields)`; its answer, or EngineUnavailable after `timeout` s."""
        msg_id = self.next_id()
        fut = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        self._send([message_cls(id=msg_id, **fields)])
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise EngineUnavailable(f"The engine did not answer within {timeout:g} s.") from None
        finally:
            self._pending.pop(msg_id, None)

    async def flush_once(self, timeout: float) -> FlushCacheResult:
        """One FlushCacheRequest; its result (not a success while requests run)."""
        fut = asyncio.get_running_loop().create_future()
        self._flush_waiters.append(fut)
        self._send([FlushCacheRequest()])
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
