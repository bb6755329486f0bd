"""The scheduler's event loop: take messages, run a step when there is work, hand outputs on.

Where messages come from and where outputs go is the caller's choice (a thread-safe queue for the
in-process Engine, ZeroMQ sockets for the server's engine process), so both share this loop, and both
hand it the runtime's scheduler itself (runtime/scheduler_base.py answers every message either sends).

An exception out of a step or a message handler is a bug, and the scheduler's state may be inconsistent
after it, so the loop does not go on as if nothing happened: it logs the traceback, aborts every request
with a 500-class finish reason that says so, marks the scheduler failed (`scheduler.failed`: later requests
are refused with it and health checks report it) and pushes an `EngineState` so the front end fails
`/health` at once. Control messages are still answered (a trainer is never left waiting).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from runtime.messages import EngineState, FlushCacheResult, RequestOutput, SchedulerInput
from runtime.scheduler_base import SchedulerBase

logger = logging.getLogger(__name__)

Receive = Callable[[bool], list[SchedulerInput]]   # block: wait for at least one message
Send = Callable[[list[RequestOutput | FlushCacheResult]], None]


def fail_scheduler(scheduler: SchedulerBase, where: str, error: BaseException) -> list:
    """Mark the scheduler failed after a bug; returns the state push and the aborted requests' outputs."""
    message = (f"Internal error in the engine's scheduler ({where}): {type(error).__name__}: {error}. This is a bug "
               "(the engine log has the traceback); the engine serves nothing more until it is restarted.")
    logger.exception("Scheduler %s failed; the engine is marked failed", where)
    first = scheduler.failed is None
    if first:
        scheduler.failed = message
    outputs: list = []
    if first:
        outputs.append(EngineState(weight_version=scheduler.weight_version, unusable=scheduler.unusable,
                                   paused=scheduler.paused is not None, failed=message))
    try:
        outputs += scheduler.abort("", abort_all=True, message=scheduler.failed, status_code=500)
    except Exception:  # the request table itself is broken: the front end still fails every call
        logger.exception("Aborting the requests after the failure failed too")
    return outputs


def run_scheduler_loop(scheduler: SchedulerBase, receive: Receive, send: Send, stop: threading.Event) -> None:
    while not stop.is_set():
        messages = receive(scheduler.failed is not None or not scheduler.has_work())
        outputs: list = []
        for msg in messages:
            try:
                outputs += scheduler.handle(msg)
            except ValueError as e:
                logger.error("Rejected message %s: %s", type(msg).__name__, e)
            except Exception as e:
                outputs += fail_scheduler(scheduler, f"handling {type(msg).__name__}", e)
        try:
            outputs += scheduler.controller.poll()  # a join that ended, a trainer gone between buckets
        except Exception as e:
            outputs += fail_scheduler(scheduler, "watching weight updates", e)
        if scheduler.failed is None and scheduler.has_work():
            try:
                outputs += scheduler.step()
            except Exception as e:
                outputs += fail_scheduler(scheduler, "step", e)
        if outputs:
            send(outputs)
