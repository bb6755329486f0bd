"""What the HTTP process's client of the engine raises to routes, each mapped to one HTTP status, and the
words for an engine process that died."""

from __future__ import annotations

import signal


class EngineUnavailable(Exception):
    """The engine is not ready, has died, or did not answer in time: HTTP 503 (`status`)."""

    status = 503


class EngineRequestFailed(EngineUnavailable):
    """The engine ended a request with a 5xx finish reason (`status_code` 503: the weights are unusable;
    500: the scheduler hit a bug): the whole call answers that status with the reason."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class QueueFull(Exception):
    """Too many samples waiting or running (--max-queued-requests): HTTP 429 with Retry-After."""


class ClientDisconnected(Exception):
    """The client of a call went away; its samples were aborted in the engine."""


def engine_exit_reason(code: int | None) -> str:
    """"The engine process was killed by SIGKILL." / "... exited with code 1." from a Process.exitcode."""
    if code is None:
        return "The engine process is gone (its exit status is unknown)."
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (a memory-mapped file that shrank, or a crash in native code)" if name == "SIGBUS" else ""
        return f"The engine process was killed by {name}{hint}."
    return f"The engine process exited with code {code}."
