"""`LocalRouter`: sglang-router (`python -m sglang_router.launch_router`, the `sglang-router` package) in
a subprocess in front of local rollout servers, for tests and examples.

    with LocalRouter([s.url for s in servers]).start() as router:
        client = RolloutClient.from_router(router.url)

The router is SGLang's own (Rust); nothing of it is reimplemented here. It logs to a file (`log_path`; its
tail is in the error if it fails to start).
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Self, Sequence

import requests

from rollout.client.local_server import free_port
from rollout.client.managed_process import ManagedProcess


class LocalRouter(ManagedProcess):
    name = "router"
    start_timeout = 120.0
    stop_timeout = 30.0

    def __init__(self, worker_urls: Sequence[str], *, host: str = "127.0.0.1", port: int | None = None,
                 policy: str = "cache_aware", log_path: str | None = None, flags: Sequence[str] = ()):
        """`flags`: more launch_router flags (e.g. ["--api-key", key])."""
        self.worker_urls = [u.rstrip("/") for u in worker_urls]
        self.port = port or free_port()
        args = [sys.executable, "-m", "sglang_router.launch_router", "--host", host, "--port", str(self.port),
                "--worker-urls", *self.worker_urls, "--policy", policy, "--log-level", "warn", *flags]
        if "--prometheus-port" not in flags:  # its default port (29000) is taken by a second router on the host
            args += ["--prometheus-port", str(free_port())]
        super().__init__(args, url=f"http://{host}:{self.port}", log_path=log_path, log_prefix="sglang-router-")

    def spawn(self) -> Self:
        if importlib.util.find_spec("sglang_router") is None:
            raise RuntimeError("LocalRouter needs sglang-router: python -m pip install sglang-router")
        return super().spawn()

    def healthy_workers(self) -> list[str]:
        """The workers the router lists as healthy (GET /workers)."""
        body = requests.get(self.url + "/workers", timeout=5).json()
        return [w["url"].rstrip("/") for w in body.get("workers", []) if w.get("is_healthy")]

    def is_ready(self) -> bool:
        """Ready once the router lists every worker as healthy."""
        return sorted(self.healthy_workers()) == sorted(self.worker_urls)

    def not_ready_message(self, timeout: float) -> str:
        return f"The router at {self.url} did not list its workers within {timeout:g} s"

    def __repr__(self) -> str:
        return f"LocalRouter({self.url}, workers={self.worker_urls})"
