"""Adding and removing workers of a running sglang-router. 0.3: POST /workers {"url"} (queued: the router
adds the worker once it answers its health check), DELETE /workers/{id} (the id GET /workers lists); older
routers: POST /add_worker?url=..., POST /remove_worker?url=...."""

from __future__ import annotations

import time
from typing import Any

import requests

from rollout.client.errors import server_error


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _check(resp: requests.Response, where: str) -> None:
    if resp.status_code >= 400:
        raise server_error(resp.status_code, resp.text.strip(), where)


def listed_workers(router_url: str, *, api_key: str | None = None, timeout: float = 10.0) -> list[dict[str, Any]]:
    """GET /workers: one dict per worker (url, id, is_healthy, ...)."""
    resp = requests.get(router_url.rstrip("/") + "/workers", headers=_headers(api_key), timeout=timeout)
    _check(resp, router_url + "/workers")
    return list(resp.json().get("workers", []))


def add_worker(router_url: str, worker_url: str, *, api_key: str | None = None, timeout: float = 60.0) -> None:
    """Register `worker_url` and wait until the router lists it as healthy."""
    base = router_url.rstrip("/")
    resp = requests.post(base + "/workers", json={"url": worker_url}, headers=_headers(api_key), timeout=timeout)
    if resp.status_code in (404, 405):
        resp = requests.post(base + "/add_worker", params={"url": worker_url}, headers=_headers(api_key),
                             timeout=timeout)
    _check(resp, base + "/workers")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(w.get("url", "").rstrip("/") == worker_url and w.get("is_healthy", True)
               for w in listed_workers(base, api_key=api_key)):
            return
        time.sleep(0.2)
    raise TimeoutError(f"The router at {base} did not list {worker_url} as healthy within {timeout:g} s.")


def remove_worker(router_url: str, worker_url: str, *, api_key: str | None = None, timeout: float = 30.0) -> None:
    """Stop the router sending `worker_url` requests (nothing to do if it does not list it)."""
    base = router_url.rstrip("/")
    for w in listed_workers(base, api_key=api_key, timeout=timeout):
        if w.get("url", "").rstrip("/") != worker_url:
            continue
        worker_id = w.get("id") or w.get("worker_id")
        if worker_id:
            resp = requests.delete(f"{base}/workers/{worker_id}", headers=_headers(api_key), timeout=timeout)
        else:
            resp = requests.post(base + "/remove_worker", params={"url": worker_url}, headers=_headers(api_key),
                                 timeout=timeout)
        _check(resp, base + "/workers")
    deadline = time.monotonic() + timeout  # 0.3 queues the removal too
    while any(w.get("url", "").rstrip("/") == worker_url for w in listed_workers(base, api_key=api_key)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"The router at {base} still lists {worker_url} after {timeout:g} s.")
        time.sleep(0.2)
