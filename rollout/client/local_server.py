"""`rollout.launch_server(...)`: a local server subprocess from Python, for notebooks, tests and examples.

    with rollout.launch_server(model_path, num_threads=1) as server:
        client = rollout.RolloutClient(server.url)

Keyword arguments are the CLI's flags (`--model-path` is `model_path=`; `True` turns a switch on). The
server logs to a file (`server.log_path`; its tail is in the error if it fails to start).
"""

from __future__ import annotations

import socket
import sys
from typing import Any

import requests

from rollout.client.managed_process import ManagedProcess


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


class LocalServer(ManagedProcess):
    """`python -m rollout.launch_server` in a subprocess; a context manager that stops it on exit.
    `stop()` sends SIGTERM: the server aborts in-flight requests and exits 0."""

    name = "server"

    def __init__(self, model_path: str | None = None, *, host: str = "127.0.0.1", port: int | None = None,
                 log_path: str | None = None, env: dict[str, str] | None = None, flags: list[str] = (),
                 die_with_parent: bool = False, **server_args: Any):
        """`flags`: raw CLI flags added after those made from `model_path` and `server_args`;
        `die_with_parent`: see ManagedProcess."""
        self.host = host
        self.port = port or free_port()
        self.api_key: str | None = server_args.get("api_key")
        args = [sys.executable, "-m", "rollout.launch_server", "--host", host, "--port", str(self.port),
                *server_flags(model_path=model_path, **server_args), *flags]
        super().__init__(args, url=f"http://{host}:{self.port}", log_path=log_path, log_prefix="rollout-server-",
                         env=env, die_with_parent=die_with_parent)

    def is_ready(self) -> bool:
        """/health answers 200 once the model is loaded."""
        return requests.get(self.url + "/health", timeout=5).status_code == 200

    def __repr__(self) -> str:
        return f"LocalServer({self.url}, running={self.running})"


def launch_server(model_path: str | None = None, *, timeout: float = 300.0, **server_args: Any) -> LocalServer:
    """Start a server and wait until it is ready; use it as a context manager or call `.stop()`.
    `model_path` None serves the embedded default model (SmolLM2-135M-Instruct)."""
    return LocalServer(model_path, **server_args).start(timeout)
