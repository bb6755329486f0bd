"""The workers behind an sglang-router, as the router lists them.

sglang-router forwards generation (/generate, /v1/completions, /v1/chat/completions, ...) and flushes
every worker's cache, but weight updates, pause / continue and aborts must reach each worker directly; a
client given a router needs the workers' URLs, given explicitly or read from the router here.
"""

from __future__ import annotations

from typing import Any

import requests

from rollout.client.errors import ConnectionFailedError, server_error


def _get(url: str, api_key: str | None, timeout: float) -> requests.Response:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        return requests.get(url, headers=headers, timeout=timeout)
    except requests.exceptions.RequestException as e:
        raise ConnectionFailedError(url, 1, e) from e


def _urls(body: Any) -> list[str]:
    """sglang-router 0.3: {"workers": [{"url": ...}, ...]}; older routers' /list_workers: {"urls": [...]}."""
    if isinstance(body, dict) and isinstance(body.get("workers"), list):
        return [w["url"] for w in body["workers"] if isinstance(w, dict) and isinstance(w.get("url"), str)]
    if isinstance(body, dict) and isinstance(body.get("urls"), list):
        return [u for u in body["urls"] if isinstance(u, str)]
    return []


def discover_workers(router_url: str, *, api_key: str | None = None, timeout: float = 10.0) -> list[str]:
    """The URLs of the workers registered with the router at `router_url` (GET /workers, else
    /list_workers); ValueError when it lists none."""
    base = router_url.rstrip("/")
    for path in ("/workers", "/list_workers"):
        resp = _get(base + path, api_key, timeout)
        if resp.status_code == 404:
            continue
        if resp.status_code >= 400:
            raise server_error(resp.status_code, resp.text.strip(), base + path)
        urls = _urls(resp.json())
        if urls:
            return [u.rstrip("/") for u in urls]
    raise ValueError(f"The router at {base} lists no workers (GET /workers and /list_workers); pass workers=[...].")
