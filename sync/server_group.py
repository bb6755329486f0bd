"""The trainer's handle on rollout servers joined in one weight-update group: create, push, destroy.

    group = ServerGroup.create(["http://10.0.0.2:30000", "http://10.0.0.3:30000"], "10.0.0.1", 29500,
                               backend="gloo")
    group.push(model.named_parameters(), weight_version="step-12")    # buckets, one broadcast each
    group.destroy()

The trainer is rank 0 and hosts the group's store; server i joins as rank i + 1. `create` posts
/init_weights_update_group to every server concurrently while joining itself (the join needs everyone).
`push` announces each bucket to every server (/update_weights_from_distributed, load_format
"flattened_bucket") and broadcasts it; the last bucket carries `weight_version`, so the servers switch
version once the whole update is in (and count earlier buckets as parts of it: see runtime/controller.py).
Only the standard library talks HTTP here, so a trainer needs nothing beyond torch.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable

import torch
import torch.distributed as dist

from sync.errors import GroupJoinError
from sync.process_group import destroy_process_group, init_custom_process_group, tcp_init_method
from sync.sender import DEFAULT_BUCKET_BYTES, WeightSender

HTTP_MARGIN_S = 60.0  # on top of the group timeout: how long a POST may take before we give up on it


class WeightPushError(RuntimeError):
    """A server refused or failed an update (its message says why), or the broadcast itself broke."""


def post_json(url: str, body: dict[str, Any], timeout: float, api_key: str | None = None) -> dict[str, Any]:
    """POST JSON; the answer's JSON (also for 4xx/5xx answers, which carry a message)."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            answer = json.loads(text)
        except ValueError:
            answer = {}
        message = answer.get("message") or answer.get("error", {}).get("message") or text[:500]
        return {"success": False, "message": f"HTTP {e.code}: {message}"}
    except (urllib.error.URLError, OSError) as e:
        return {"success": False, "message": f"{url} did not answer: {e}"}


class ServerGroup:
    def __init__(self, urls: list[str], group: dist.ProcessGroup, group_name: str, timeout: float,
                 bucket_bytes: int, api_key: str | None):
        self.urls = urls
        self.group = group
        self.group_name = group_name
        self.timeout = timeout
        self.sender = WeightSender(group, bucket_bytes=bucket_bytes)
        self.api_key = api_key
        self._pool = ThreadPoolExecutor(max_workers=max(len(urls), 1), thread_name_prefix="weight-push")

    @classmethod
    def create(cls, urls: Iterable[str], master_address: str, master_port: int, *, backend: str = "gloo",
               group_name: str = "weight_update_group", timeout: float = 300.0,
               bucket_bytes: int = DEFAULT_BUCKET_BYTES, api_key: str | None = None) -> "ServerGroup":
        """Join as rank 0 while every server joins; GroupJoinError (with each server's answer) on failure."""
        urls = [u.rstrip("/") for u in urls]
        world_size = len(urls) + 1
        with ThreadPoolExecutor(max_workers=len(urls)) as pool:
            answers = [pool.submit(post_json, f"{url}/init_weights_update_group", {
                "master_address": master_address, "master_port": master_port, "rank_offset": i + 1,
                "world_size": world_size, "group_name": group_name, "backend": backend, "timeout": timeout,
            }, timeout + HTTP_MARGIN_S, api_key) for i, url in enumerate(urls)]
            error: Exception | None = None
            group = None
            try:
                group = init_custom_process_group(backend, tcp_init_method(master_address, master_port), world_size,
                                                  0, group_name, timeout=timeout)
            except GroupJoinError as e:
                error = e
            results = [f.result() for f in answers]  # each server fails within its timeout too
        failed = [f"{url}: {r.get('message')}" for url, r in zip(urls, results) if not r.get("success")]
        if error is not None or failed:
            if group is not None:
                destroy_process_group(group)
            raise GroupJoinError("; ".join(([str(error)] if error else []) + failed))
        return cls(urls, group, group_name, timeout, bucket_bytes, api_key)

    def _announce(self, body: dict[str, Any]) -> list[Future]:
        return [self._pool.submit(post_json, f"{url}/update_weights_from_distributed", body,
                                  self.timeout + HTTP_MARGIN_S, self.api_key) for url in self.urls]

    def _collect(self, futures: list[Future], what: str) -> list[dict[str, Any]]:
        results = [f.result() for f in futures]
        failed = [f"{url}: {r.get('message')}" for url, r in zip(self.urls, results) if not r.get("success")]
        if failed:
            raise WeightPushError(f"Update of {what} failed on {len(failed)} of {len(self.urls)} servers: "
                                  + "; ".join(failed))
        return results

    def push(self, named: Iterable[tuple[str, torch.Tensor]], *, weight_version: str | None = None,
             load_format: str | None = "flattened_bucket", flush_cache: bool = True) -> None:
        """Send every tensor to every server; raises WeightPushError if any server did not apply it.

        load_format "flattened_bucket" (default): one request and one broadcast per bucket of at most
        `bucket_bytes`; None: one request for all tensors and one broadcast per tensor.
        """
        named = [(n, t.detach()) for n, t in named]
        base = {"group_name": self.group_name, "flush_cache": flush_cache}
        if load_format is None:
            specs = self.sender.specs(named)
            futures = self._announce({**base, "names": specs.names, "dtypes": specs.dtypes, "shapes": specs.shapes,
                                      "weight_version": weight_version})
            self._send(lambda: self.sender.send_tensors(named), futures, f"{len(named)} tensors")
            return
        if load_format != "flattened_bucket":
            raise ValueError(f"load_format must be None or 'flattened_bucket', got {load_format!r}.")
        metas = self.sender.plan(named)
        start = 0
        for k, meta in enumerate(metas):
            chunk = named[start:start + len(meta.names)]
            start += len(meta.names)
            last = k == len(metas) - 1
            futures = self._announce({**base, "names": meta.names, "dtypes": meta.dtypes, "shapes": meta.shapes,
                                      "load_format": "flattened_bucket",
                                      "weight_version": weight_version if last else None})
            self._send(lambda: self.sender.send_buckets(chunk), futures, f"bucket {k + 1}/{len(metas)}")

    def _send(self, broadcast: Any, futures: list[Future], what: str) -> None:
        # The servers answer only after receiving, so the broadcast runs while their POSTs are open.
        try:
            broadcast()
        except Exception as e:
            answers = [f.result() for f in futures]  # bounded: each server gives up within its timeout
            raise WeightPushError(f"Broadcast of {what} failed: {e}; servers said: "
                                  + "; ".join(f"{u}: {a.get('message')}" for u, a in zip(self.urls, answers))) from e
        self._collect(futures, what)

    def destroy(self) -> None:
        """Every server leaves the group, then the trainer; the group name can be used again."""
        futures = [self._pool.submit(post_json, f"{url}/destroy_weights_update_group",
                                     {"group_name": self.group_name}, HTTP_MARGIN_S, self.api_key)
                   for url in self.urls]
        results = [f.result() for f in futures]
        destroy_process_group(self.group)
        self._pool.shutdown(wait=False)
        failed = [f"{url}: {r.get('message')}" for url, r in zip(self.urls, results) if not r.get("success")]
        if failed:
            raise WeightPushError("destroy_weights_update_group failed on " + "; ".join(failed))
