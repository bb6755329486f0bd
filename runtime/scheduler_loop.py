"""The scheduler's event loop: take messages, run a step when there is work, hand outputs on.

Where messages come from and where outputs go is the caller's choice (a thread-safe queue for the
in-process Engine, ZeroMQ sockets for the server's engine process), so both share this loop, and both
hand it the runtime's scheduler itself (runtime/scheduler_base.py answers every message either sends).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from runtime.messages import FlushCacheResult, RequestOutput, SchedulerInput
from runtime.scheduler_base import SchedulerBase

logger = logging.getLogger(__name__)

Receive = Callable[[bool], list[SchedulerInput]]   # block: wait for at least one message
Send = Callable[[list[RequestOutput | FlushCacheResult]], None]


def run_scheduler_loop(scheduler: SchedulerBase, receive: Receive, send: Send, stop: threading.Event) -> None:
    while not stop.is_set():
        messages = receive(not scheduler.has_work())
        outputs: list[RequestOutput | FlushCacheResult] = []
        for msg in messages:
            try:
                outputs += scheduler.handle(msg)
            except ValueError as e:
                logger.error("Rejected message %s: %s", type(msg).__name__, e)
        if scheduler.has_work():
            try:
                outputs += scheduler.step()
            except Exception as e:  # a bug: fail the requests loudly rather than hang their clients
                logger.exception("Scheduler step failed")
                outputs += scheduler.abort("", abort_all=True, message=f"Internal error in the scheduler: {e!r}")
        if outputs:
            send(outputs)
