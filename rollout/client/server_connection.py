"""One rollout server as the client sees it: its URL, a pooled HTTP session, and how many requests are
outstanding on it (what the balancer reads). Calls are blocking; the async client runs them in threads."""

from __future__ import annotations

import threading
import time
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter

from rollout.client.errors import (ConnectionFailedError, RequestTimeoutError, ServiceUnavailableError,
                                   server_error)
from rollout.client.retry_policy import NO_RETRY, RetryPolicy


def _never_sent(e: requests.exceptions.ConnectionError) -> bool:
    """No connection was made (refused, unreachable, connect timeout): the request never reached a server.
    Anything else (reset, closed mid-answer) may have come after the server read it."""
    cause = e.args[0] if e.args else None
    if isinstance(cause, urllib3.exceptions.MaxRetryError):
        cause = cause.reason
    return isinstance(cause, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError))


def _error_message(resp: requests.Response) -> str:
    """The server's own words: {"error": {"message"}} (API.md), {"message"} (weight updates), or the body."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip() or resp.reason
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if "message" in body:
            return str(body["message"])
    return resp.text.strip()


class ServerConnection:
    def __init__(self, url: str, *, api_key: str | None = None, pool_size: int = 64, connect_timeout: float = 5.0):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size)  # urllib3's pool is thread-safe
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self._lock = threading.Lock()
        self.outstanding = 0       # requests (weighted, e.g. samples) sent and not yet answered
        self.down_until = 0.0      # monotonic time until which the balancer avoids this server

    def __repr__(self) -> str:
        return f"ServerConnection({self.url!r}, outstanding={self.outstanding})"

    # --- load accounting (the balancer's view) --------------------------------------------------

    def acquire(self, weight: int = 1) -> None:
        with self._lock:
            self.outstanding += weight

    def release(self, weight: int = 1) -> None:
        with self._lock:
            self.outstanding -= weight

    def mark_down(self, seconds: float) -> None:
        self.down_until = time.monotonic() + seconds

    @property
    def is_down(self) -> bool:
        return time.monotonic() < self.down_until

    # --- calls ----------------------------------------------------------------------------------

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, *, timeout: float | None,
             retry: RetryPolicy = NO_RETRY, params: dict[str, Any] | None = None) -> Any:
        """Send one request; answer the decoded JSON (or text, or None for an empty body).

        Raises the typed errors of rollout.client.errors. `retry` decides whether a connection failure or
        a 503 is tried again (calls given a policy are idempotent); a timeout never is (the caller's time is
        spent). ConnectionFailedError.sent tells a connection lost after the request went out (the server
        may have run it) from one never made."""
        attempt = 0
        sent = False
        while True:
            try:
                resp = self.session.request(method, self.url + path, json=body, params=params,
                                            timeout=(self.connect_timeout, timeout))
            except requests.exceptions.ConnectTimeout as e:
                failure: BaseException = e
                sent = False
            except requests.exceptions.Timeout:
                raise RequestTimeoutError(self.url + path, timeout) from None
            except requests.exceptions.ConnectionError as e:
                failure = e
                sent = not _never_sent(e)
            else:
                if resp.status_code < 400:
                    return self._decode(resp)
                err = server_error(resp.status_code, _error_message(resp), self.url + path)
                if not (isinstance(err, ServiceUnavailableError) and retry.retry_unavailable
                        and attempt < retry.retries):
                    raise err
                failure = err
            if attempt >= retry.retries:
                if isinstance(failure, ServiceUnavailableError):
                    raise failure
                raise ConnectionFailedError(self.url + path, attempt + 1, failure, sent=sent) from failure
            time.sleep(retry.delay(attempt))
            attempt += 1

    @staticmethod
    def _decode(resp: requests.Response) -> Any:
        if not resp.content:
            return None
        if resp.headers.get("content-type", "").startswith("application/json"):
            return resp.json()
        return resp.text

    def close(self) -> None:
        self.session.close()
