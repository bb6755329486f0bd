"""`LocalRouter`: sglang-router (`python -m sglang_router.launch_router`, the `sglang-router` package) in
a subprocess in front of local rollout servers, for tests and examples.

    with LocalRouter([s.url for s in servers]).start() as router:
        client = RolloutClient.from_router(router.url)

The router is SGLang's own (Rust); nothing of it is reimplemented here. It logs to a file (`log_path`; its
tail is in the error if it fails to start).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Sequence

import requests

from rollout.client.local_server import free_port


class LocalRouter:
    def __init__(self, worker_urls: Sequence[str], *, host: str = "127.0.0.1", port: int | None = None,
                 policy: str = "cache_aware", log_path: str | None = None, flags: Sequence[str] = ()):
        """`flags`: more launch_router flags (e.g. ["--api-key", key])."""
        self.worker_urls = [u.rstrip("/") for u in worker_urls]
        self.port = port or free_port()
        self.url = f"http://{host}:{self.port}"
        self.args = [sys.executable, "-m", "sglang_router.launch_router", "--host", host, "--port", str(self.port),
                     "--worker-urls", *self.worker_urls, "--policy", policy, "--log-level", "warn", *flags]
        if "--prometheus-port" not in flags:  # its default port (29000) is taken by a second router on the host
            self.args += ["--prometheus-port", str(free_port())]
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="sglang-router-", suffix=".log")
            os.close(fd)
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    def spawn(self) -> "LocalRouter":
        if importlib.util.find_spec("sglang_router") is None:
            raise RuntimeError("LocalRouter needs sglang-router: python -m pip install sglang-router")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def start(self, timeout: float = 120.0) -> "LocalRouter":
        self.spawn()
        try:
            self.wait_until_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def healthy_workers(self) -> list[str]:
        """The workers the router lists as healthy (GET /workers)."""
        body = requests.get(self.url + "/workers", timeout=5).json()
        return [w["url"].rstrip("/") for w in body.get("workers", []) if w.get("is_healthy")]

    def wait_until_ready(self, timeout: float = 120.0) -> None:
        """Until the router lists every worker as healthy; RuntimeError with the log if it exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"The router exited with code {self.proc.returncode} while starting:\n{self.log()}")
            try:
                if sorted(self.healthy_workers()) == sorted(self.worker_urls):
                    return
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"The router at {self.url} did not list its workers within {timeout:g} s:\n{self.log()}")

    def log(self, chars: int = 20000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def __enter__(self) -> "LocalRouter":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LocalRouter({self.url}, workers={self.worker_urls})"
