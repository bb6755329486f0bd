"""rl-rollout's service package. The client API is exported lazily, so the server processes, which import
this package too, never load it:

    from rollout import RolloutClient, AsyncRolloutClient, launch_server
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RolloutClient": "rollout.client",
    "AsyncRolloutClient": "rollout.async_client",
    "GenerateResult": "rollout.client_results",
    "EncodeResult": "rollout.client_results",
    "FinishReason": "rollout.client_results",
    "ServerReply": "rollout.client_results",
    "RetryPolicy": "rollout.retry_policy",
    "BroadcastGroup": "rollout.broadcast_group",
    "LocalServer": "rollout.local_server",
    "RolloutError": "rollout.client_errors",
    "ServerError": "rollout.client_errors",
    "BadRequestError": "rollout.client_errors",
    "UnauthorizedError": "rollout.client_errors",
    "ServiceUnavailableError": "rollout.client_errors",
    "RequestTimeoutError": "rollout.client_errors",
    "ConnectionFailedError": "rollout.client_errors",
    "WeightUpdateError": "rollout.client_errors",
}

__all__ = sorted([*_EXPORTS, "launch_server"])


def __getattr__(name: str) -> Any:
    if name == "launch_server":
        # The submodule rollout.launch_server (the CLI) is made callable as rollout.local_server.launch_server,
        # so `rollout.launch_server(...)` works whether or not the CLI module was imported first.
        return importlib.import_module("rollout.launch_server")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rollout' has no attribute {name!r}")
