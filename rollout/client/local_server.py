"""`rollout.launch_server(...)`: a local server subprocess from Python, for notebooks, tests and examples.

    with rollout.launch_server(model_path, num_threads=1) as server:
        client = rollout.RolloutClient(server.url)

Keyword arguments are the CLI's flags (`--model-path` is `model_path=`; `True` turns a switch on). The
server logs to a file (`server.log_path`; its tail is in the error if it fails to start).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_flags(**kwargs: Any) -> list[str]:
    """{"model_path": "x", "is_embedding": True, "api_key": None} -> ["--model-path", "x", "--is-embedding"]."""
    flags: list[str] = []
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        flags += [flag] if value is True else [flag, str(value)]
    return flags


class LocalServer:
    """`python -m rollout.launch_server` in a subprocess; a context manager that stops it on exit."""

    def __init__(self, model_path: str | None = None, *, host: str = "127.0.0.1", port: int | None = None,
                 log_path: str | None = None, env: dict[str, str] | None = None, flags: list[str] = (),
                 **server_args: Any):
        """`flags`: raw CLI flags added after those made from `model_path` and `server_args`."""
        self.host = host
        self.port = port or free_port()
        self.url = f"http://{host}:{self.port}"
        self.api_key: str | None = server_args.get("api_key")
        self.args = [sys.executable, "-m", "rollout.launch_server", "--host", host, "--port", str(self.port),
                     *server_flags(model_path=model_path, **server_args), *flags]
        self._own_log = log_path is None  # a temporary log is removed after a clean exit
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="rollout-server-", suffix=".log")
            os.close(fd)
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    def spawn(self) -> "LocalServer":
        """Start the process without waiting (start several, then `wait_until_ready` each)."""
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ if self.env is None else self.env))
        return self

    def start(self, timeout: float = 300.0) -> "LocalServer":
        self.spawn()
        try:
            self.wait_until_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_until_ready(self, timeout: float = 300.0) -> None:
        """Until /health answers 200 (the model is loaded); RuntimeError with the log if the process exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"The server exited with code {self.proc.returncode} while starting:\n{self.log()}")
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"The server at {self.url} was not ready within {timeout:g} s:\n{self.log()}")

    def log(self, chars: int = 20000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        """Signal the server (SIGTERM: it aborts in-flight requests and exits 0), SIGKILL after `timeout`;
        returns its exit code."""
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

    def __enter__(self) -> "LocalServer":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LocalServer({self.url}, running={self.running})"


def launch_server(model_path: str | None = None, *, timeout: float = 300.0, **server_args: Any) -> LocalServer:
    """Start a server and wait until it is ready; use it as a context manager or call `.stop()`.
    `model_path` None serves the embedded default model (SmolLM2-135M-Instruct)."""
    return LocalServer(model_path, **server_args).start(timeout)
