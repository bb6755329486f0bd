"""`ServerActor`: the body of the small Ray actor that owns one rollout server process on its node.

Plain Python: `rollout.client.fleet` wraps it with `ray.remote` when it places servers, so importing this
module never imports ray. The actor starts `python -m rollout.launch_server` as a subprocess (LocalServer)
on the node it was placed on, and can restart it on the same port, so a replacement keeps the URL that the
router and the trainer's client already know. The server dies with the actor (SIGKILL from Linux when the actor
process dies, however it dies), so a lost actor leaves no server serving stale weights behind it.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
from typing import Any

from rollout.client.local_server import LocalServer, free_port


def node_address() -> str:
    """This node's address as other nodes reach it (the local cluster: 127.0.0.1)."""
    try:
        import ray.util  # only ever called inside a Ray actor
        return ray.util.get_node_ip_address()
    except Exception:
        return socket.gethostbyname(socket.gethostname())


class ServerActor:
    def __init__(self, host: str | None = None, port: int | None = None):
        self.host = host or node_address()
        self.port = port or free_port()
        self.server: LocalServer | None = None
        # Linux ties the server's death signal to the thread that forked it, and Ray runs actor methods on
        # pool threads: one thread of our own, alive as long as the actor, forks every server.
        self._spawner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="server-spawner")

    def start(self, server_args: dict[str, Any], timeout: float = 300.0) -> str:
        """Start (or restart) the server with `server_args` (LocalServer's keywords) and wait until it is
        ready; answers its URL."""
        self.stop(signal.SIGKILL)
        args = dict(server_args)
        self.server = LocalServer(args.pop("model_path", None), host=self.host, port=self.port, die_with_parent=True,
                                  **args)
        self._spawner.submit(self.server.spawn).result()
        try:
            self.server.wait_until_ready(timeout)
        except BaseException:
            self.stop(signal.SIGKILL)
            raise
        return self.server.url

    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def pid(self) -> int | None:
        return self.server.proc.pid if self.server is not None and self.server.proc is not None else None

    def alive(self) -> bool:
        """The server process runs (it may still be loading)."""
        return self.server is not None and self.server.running

    def log(self) -> str:
        return self.server.log() if self.server is not None else ""

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Stop the server (its engine child follows it); answers its exit code."""
        if self.server is None:
            return None
        code = self.server.stop(sig, timeout=30.0)
        self.server = None
        return code

    def actor_pid(self) -> int:
        return os.getpid()
