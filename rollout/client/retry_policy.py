"""When and how long the client waits before trying a call again."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, for idempotent calls only (generate, score, info, health, flush,
    get_weights_by_name): a connection that failed, or a 503 (loading, restarting), is tried again up to
    `retries` more times. Calls that change server state (weight updates, pause, abort) are never retried:
    the first attempt may have reached the server even though its answer did not reach us."""

    retries: int = 3
    backoff_s: float = 0.5      # first wait
    max_backoff_s: float = 8.0  # cap on one wait
    retry_unavailable: bool = True  # also retry 503 answers (a server still loading its model)
    # Resend a generate / score call once (at most once, whatever `retries` says) when a router answers
    # 5xx: a worker behind it died with the request in flight; the router sends the resend to a live one.
    # A request may so run twice on the servers; its answer reaches the caller once.
    retry_server_error: bool = False

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt `attempt + 1` (attempt counts from 0); jitter spreads the clients
        of a restarted server so they do not all knock at the same instant."""
        base = min(self.backoff_s * (2 ** attempt), self.max_backoff_s)
        return base * (0.5 + random.random() / 2)


NO_RETRY = RetryPolicy(retries=0)
