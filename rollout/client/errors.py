"""What the rollout client raises: one type per way a call can fail, each carrying the server's message.

    RolloutError                     base of everything below
    ├── ServerError                  the server answered with an error status (status, message, url)
    │   ├── BadRequestError          400: the request (or a weight update) was refused, state unchanged
    │   ├── UnauthorizedError        401: missing or wrong API key
    │   └── ServiceUnavailableError  503: loading, engine dead, or weights unusable after a broken broadcast
    ├── RequestTimeoutError          no answer within the call's timeout (the connection is closed, so the
    │                                server aborts the request)
    ├── ConnectionFailedError        could not reach the server (after any retries)
    └── WeightUpdateError            an update failed on some servers (per-server results attached)
"""

from __future__ import annotations

from typing import Any


class RolloutError(Exception):
    """Base class of every error the rollout client raises."""


class ServerError(RolloutError):
    def __init__(self, status: int, message: str, url: str):
        super().__init__(f"{url} answered {status}: {message}")
        self.status = status
        self.message = message  # the server's own words ({"error": {"message"}} or {"message"})
        self.url = url


class BadRequestError(ServerError):
    pass


class UnauthorizedError(ServerError):
    pass


class ServiceUnavailableError(ServerError):
    pass


class RequestTimeoutError(RolloutError):
    def __init__(self, url: str, timeout: float | None):
        super().__init__(f"{url} did not answer within {timeout} s.")
        self.url = url
        self.timeout = timeout


class ConnectionFailedError(RolloutError):
    def __init__(self, url: str, attempts: int, cause: BaseException, sent: bool = False):
        """`sent`: the connection dropped after the request went out, so the server may have run it (it died
        mid-request); False when no connection was made (refused, connect timeout): it never ran."""
        what = "Lost the connection to" if sent else "Could not reach"
        super().__init__(f"{what} {url} after {attempts} attempt(s): {cause}")
        self.url = url
        self.attempts = attempts
        self.sent = sent


class WeightUpdateError(RolloutError):
    """Raised after an update step failed on at least one server; `results` holds every server's answer
    (or the exception it raised), in server order."""

    def __init__(self, what: str, results: list[Any]):
        failed = [r for r in results if isinstance(r, BaseException) or not getattr(r, "success", False)]
        lines = "; ".join(str(r) if isinstance(r, BaseException) else f"{r.url}: {r.message}" for r in failed)
        super().__init__(f"{what} failed on {len(failed)} of {len(results)} server(s): {lines}")
        self.results = results


_BY_STATUS: dict[int, type[ServerError]] = {400: BadRequestError, 401: UnauthorizedError,
                                            503: ServiceUnavailableError}


def server_error(status: int, message: str, url: str) -> ServerError:
    return _BY_STATUS.get(status, ServerError)(status, message, url)
