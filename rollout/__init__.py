"""rl-rollout's service: `rollout.server` (the HTTP server a trainer talks to) and `rollout.client` (the
library a trainer talks with). The client API is exported here lazily, so the server processes, which
import this package too, never load it:

    from rollout import RolloutClient, AsyncRolloutClient, launch_server
"""

from __future__ import annotations

import importlib
from typing import Any

CLIENT_EXPORTS = (
    "RolloutClient", "AsyncRolloutClient", "GenerateResult", "EncodeResult", "FinishReason", "ServerReply",
    "RetryPolicy", "BroadcastGroup", "LocalServer", "LocalRouter", "RolloutError", "ServerError", "BadRequestError",
    "UnauthorizedError", "ServiceUnavailableError", "RequestTimeoutError", "ConnectionFailedError",
    "WeightUpdateError",
)

__all__ = sorted([*CLIENT_EXPORTS, "launch_server"])


def __getattr__(name: str) -> Any:
    if name == "launch_server":
        # The module rollout/launch_server.py (the command) is callable as the client's launcher, so
        # `rollout.launch_server(...)` works whether or not that module was imported first.
        return importlib.import_module("rollout.launch_server")
    if name in CLIENT_EXPORTS:
        return getattr(importlib.import_module("rollout.client"), name)
    raise AttributeError(f"module 'rollout' has no attribute {name!r}")
