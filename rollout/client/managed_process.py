"""`ManagedProcess`: a child process that logs to a file, is polled until ready, and is stopped with a
signal (SIGKILL if it lingers). `LocalServer` and `LocalRouter` are the two kinds; each says what "ready"
means (`is_ready`), what it is called in errors (`name`) and how long it may take to start (`start_timeout`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Callable, Self, Sequence

import requests


def die_with_parent_hook(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A Popen preexec_fn: Linux sends the child `sig` when its parent dies, even by SIGKILL (a Ray actor
    lost with its node's worker), so no orphan keeps serving. Linux counts the *thread* that forked as the
    parent: spawn from a thread that lives as long as the process. None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # looked up before the fork: the child only calls it
    parent = os.getpid()

    def hook() -> None:
        libc.prctl(1, int(sig))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the wish was made
            os._exit(1)

    return hook


# Between readiness probes: a probe is one local request, and every caller (tests, a fleet's restarts) waits
# out the gap after the process is up, on average half of it.
READY_POLL_S = 0.05


class ManagedProcess:
    name = "process"  # "The {name} exited with code ..." in errors
    start_timeout = 300.0  # seconds; what `start()` and `with` wait by default
    stop_timeout = 60.0  # seconds between the signal and SIGKILL

    def __init__(self, args: Sequence[str], *, url: str, log_path: str | None = None, log_prefix: str = "process-",
                 env: dict[str, str] | None = None, die_with_parent: bool = False):
        """`url`: where it answers once ready. `log_path` None: a temporary log, removed once the process
        exits with code 0. `die_with_parent`: killed when the process (thread) that spawned it dies
        (die_with_parent_hook)."""
        self.die_with_parent = die_with_parent
        self.args = list(args)
        self.url = url
        self._own_log = log_path is None
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix=log_prefix, suffix=".log")
            os.close(fd)
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    def is_ready(self) -> bool:
        """One readiness probe; may raise requests.RequestException / ValueError while the process starts."""
        raise NotImplementedError

    def not_ready_message(self, timeout: float) -> str:
        return f"The {self.name} at {self.url} was not ready within {timeout:g} s"

    def spawn(self) -> Self:
        """Start the process without waiting (start several, then `wait_until_ready` each)."""
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ if self.env is None else self.env),
                                     preexec_fn=die_with_parent_hook() if self.die_with_parent else None)
        return self

    def start(self, timeout: float | None = None) -> Self:
        timeout = self.start_timeout if timeout is None else timeout
        self.spawn()
        try:
            self.wait_until_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_until_ready(self, timeout: float | None = None) -> None:
        """Until `is_ready()`; RuntimeError with the log if the process exits, TimeoutError after `timeout`."""
        timeout = self.start_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"The {self.name} exited with code {self.proc.returncode} while starting:\n"
                                   f"{self.log()}")
            try:
                if self.is_ready():
                    return
            except (requests.RequestException, ValueError):
                pass
            time.sleep(READY_POLL_S)
        raise TimeoutError(f"{self.not_ready_message(timeout)}:\n{self.log()}")

    def log(self, chars: int = 20000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float | None = None) -> int | None:
        """Signal the process, SIGKILL after `timeout`; returns its exit code."""
        timeout = self.stop_timeout if timeout is None else timeout
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
            if self._own_log and self.proc.returncode == 0:
                Path(self.log_path).unlink(missing_ok=True)
        return self.proc.returncode

    def __enter__(self) -> Self:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
