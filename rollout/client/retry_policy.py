"""When and how long the client waits before trying a call again."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, for idempotent calls only (generate, score, info, health, flush,
    get_weights_by_name): a connection that was never made (refused, connect timeout), or a 503 (loading,
    restarting), is tried again up to `retries` more times; the request never ran. Calls that change server
    state (weight updates, pause, abort) are never retried: the first attempt may have reached the server
    even though its answer did not reach us.

    A generate / score request lost with its server (the connection dropped after it went out: the server
    died mid-request) is resent at most once, to another server when there is one, whatever `retries` says,
    as long as `retries` > 0; a second loss reaches the caller as ConnectionFailedError (`.sent` True). The
    request may so run twice on the servers; its answer reaches the caller once. The client counts resends
    (`AsyncRolloutClient.resends`)."""

    retries: int = 3
    backoff_s: float = 0.5      # first wait
    max_backoff_s: float = 8.0  # cap on one wait
    retry_unavailable: bool = True  # also retry 503 answers (a server still loading its model)
    # Also resend a generate / score request once when a router answers 5xx (other than 503): a worker
    # behind it died with the request in flight. The same single resend as a lost connection: a request
    # is resent once in all, never once per cause.
    retry_server_error: bool = False

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt `attempt + 1` (attempt counts from 0); jitter spreads the clients
        of a restarted server so they do not all knock at the same instant."""
        base = min(self.backoff_s * (2 ** attempt), self.max_backoff_s)
        return base * (0.5 + random.random() / 2)


NO_RETRY = RetryPolicy(retries=0)
