"""Least-outstanding-requests choice among servers."""

from __future__ import annotations

import itertools
import threading
from typing import Sequence

from rollout.client.server_connection import ServerConnection


class Balancer:
    """Picks the server with the fewest outstanding requests (weighted by samples), skipping servers
    marked down while any other is up. Ties rotate, so an idle fleet fills evenly."""

    def __init__(self, servers: Sequence[ServerConnection]):
        if not servers:
            raise ValueError("The client needs at least one server URL.")
        self.servers = list(servers)
        self._lock = threading.Lock()
        self._turn = itertools.count()

    def acquire(self, weight: int = 1, avoid: ServerConnection | None = None) -> ServerConnection:
        """Choose a server and count `weight` outstanding on it (give it back with `server.release`)."""
        with self._lock:
            up = [s for s in self.servers if not s.is_down and s is not avoid] or \
                 [s for s in self.servers if s is not avoid] or self.servers
            start = next(self._turn) % len(up)
            rotated = up[start:] + up[:start]
            best = min(rotated, key=lambda s: s.outstanding)
            best.acquire(weight)
            return best

    def replace(self, old: ServerConnection, new: ServerConnection) -> None:
        """`new` takes `old`'s place (a server replaced at another address)."""
        with self._lock:
            self.servers = [new if s is old else s for s in self.servers]
