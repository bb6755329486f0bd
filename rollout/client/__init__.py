"""The trainer's side of rl-rollout: clients for one or many rollout servers, their results and errors,
weight updates (through `sync`'s sender), and `LocalServer` / `launch_server` to start a server in a
subprocess. It speaks HTTP only; it never imports the server or the engine (`rollout.server`, `runtime`).

    from rollout.client import RolloutClient       # also exported as rollout.RolloutClient
"""

from rollout.client.async_client import AsyncRolloutClient
from rollout.client.broadcast_group import BroadcastGroup
from rollout.client.errors import (BadRequestError, ConnectionFailedError, RequestTimeoutError, RolloutError,
                                   ServerError, ServiceUnavailableError, UnauthorizedError, WeightUpdateError)
from rollout.client.local_router import LocalRouter
from rollout.client.local_server import LocalServer, launch_server
from rollout.client.results import EncodeResult, FinishReason, GenerateResult, ServerReply
from rollout.client.retry_policy import RetryPolicy
from rollout.client.rollout_client import RolloutClient

__all__ = [
    "AsyncRolloutClient", "BadRequestError", "BroadcastGroup", "ConnectionFailedError", "EncodeResult",
    "FinishReason", "GenerateResult", "LocalRouter", "LocalServer", "RequestTimeoutError", "RetryPolicy",
    "RolloutClient", "RolloutError", "ServerError", "ServerReply", "ServiceUnavailableError", "UnauthorizedError",
    "WeightUpdateError", "launch_server",
]
