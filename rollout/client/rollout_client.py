"""RolloutClient: the synchronous face of AsyncRolloutClient, for plain training loops.

    client = RolloutClient(["http://127.0.0.1:30000"])
    groups = client.generate(prompt_ids, {"max_new_tokens": 32, "temperature": 1.0}, n=4, return_logprob=True)

Every method runs the async client's coroutine on a private event loop thread and waits for it, so the
two clients behave identically. Do not call it from inside a running event loop; use the async client.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Coroutine, Iterable, Sequence, TypeVar

from rollout.client.async_client import AsyncRolloutClient
from rollout.client.broadcast_group import BroadcastGroup
from rollout.client.results import EncodeResult, GenerateResult, ServerReply

T = TypeVar("T")


class RolloutClient:
    def __init__(self, urls: str | Sequence[str] | AsyncRolloutClient, **options: Any):
        """Options as AsyncRolloutClient: workers (the servers behind a router given as `urls`), api_key,
        max_concurrency, timeout, connect_timeout, retry, progress_min. An AsyncRolloutClient is wrapped
        as it is (no options)."""
        self.aio = urls if isinstance(urls, AsyncRolloutClient) else AsyncRolloutClient(urls, **options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rollout-client-loop", daemon=True)
        self._thread.start()

    @classmethod
    def from_router(cls, router_url: str, **options: Any) -> "RolloutClient":
        """Generation through the sglang-router at `router_url`, control calls to each worker it lists."""
        return cls(AsyncRolloutClient.from_router(router_url, **options))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # Ctrl-C in the caller: stop the work on the loop too
            raise

    @property
    def urls(self) -> list[str]:
        return self.aio.urls

    @property
    def router_urls(self) -> list[str]:
        return self.aio.router_urls

    @property
    def resends(self) -> int:
        """Requests resent after their server was lost mid-request (at most once each; RetryPolicy)."""
        return self.aio.resends

    def replace_worker(self, old_url: str, new_url: str) -> None:
        """See AsyncRolloutClient.replace_worker."""
        self.aio.replace_worker(old_url, new_url)

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self.aio.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    def __enter__(self) -> "RolloutClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return repr(self.aio).replace("AsyncRolloutClient", "RolloutClient", 1)

    # --- generation and scoring -----------------------------------------------------------------

    def generate(self, prompts: Sequence[Any], sampling_params: dict[str, Any] | Sequence[dict] | None = None,
                 **kwargs: Any) -> list[list[GenerateResult]]:
        """See AsyncRolloutClient.generate: one list of n samples per prompt, in order."""
        return self._run(self.aio.generate(prompts, sampling_params, **kwargs))

    def encode(self, inputs: Sequence[Any], **kwargs: Any) -> list[EncodeResult]:
        return self._run(self.aio.encode(inputs, **kwargs))

    def classify(self, inputs: Sequence[Any], **kwargs: Any) -> list[EncodeResult]:
        return self._run(self.aio.classify(inputs, **kwargs))

    def score(self, query: str | list[int], items: Sequence[Any], label_token_ids: list[int],
              **kwargs: Any) -> list[list[float]]:
        return self._run(self.aio.score(query, items, label_token_ids, **kwargs))

    # --- health, info, cache, abort -------------------------------------------------------------

    def health(self, timeout: float = 10.0) -> dict[str, bool]:
        return self._run(self.aio.health(timeout))

    def wait_until_ready(self, timeout: float = 300.0) -> None:
        self._run(self.aio.wait_until_ready(timeout))

    def model_info(self) -> list[dict[str, Any]]:
        return self._run(self.aio.model_info())

    def server_info(self) -> list[dict[str, Any]]:
        return self._run(self.aio.server_info())

    def flush_cache(self, timeout: float = 0.0) -> list[ServerReply]:
        return self._run(self.aio.flush_cache(timeout))

    def abort(self, rid: str | None = None) -> None:
        self._run(self.aio.abort(rid))

    # --- weights --------------------------------------------------------------------------------

    def pause_generation(self, mode: str = "abort") -> list[ServerReply]:
        return self._run(self.aio.pause_generation(mode))

    def continue_generation(self) -> list[ServerReply]:
        return self._run(self.aio.continue_generation())

    def update_weight_version(self, new_version: str, abort_all_requests: bool = False) -> list[ServerReply]:
        return self._run(self.aio.update_weight_version(new_version, abort_all_requests))

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list[Any]:
        return self._run(self.aio.get_weights_by_name(name, truncate_size))

    def verify_weights(self, expected: Iterable[tuple[str, Any]], rows: int = 4) -> None:
        self._run(self.aio.verify_weights(expected, rows))

    def update_weights_from_disk(self, model_path: str, **kwargs: Any) -> list[ServerReply]:
        """See AsyncRolloutClient.update_weights_from_disk (weight_version, flush_cache, pause, verify)."""
        return self._run(self.aio.update_weights_from_disk(model_path, **kwargs))

    def update_weights_from_tensor(self, named_tensors: Iterable[tuple[str, Any]], **kwargs: Any) -> list[ServerReply]:
        """See AsyncRolloutClient.update_weights_from_tensor (weight_version, bucket_bytes, pause, verify)."""
        return self._run(self.aio.update_weights_from_tensor(named_tensors, **kwargs))

    def init_weights_update_group(self, master_address: str = "127.0.0.1", master_port: int | None = None,
                                  **kwargs: Any) -> BroadcastGroup:
        return self._run(self.aio.init_weights_update_group(master_address, master_port, **kwargs))

    def update_weights_from_distributed(self, group: BroadcastGroup, named_tensors: Iterable[tuple[str, Any]],
                                        **kwargs: Any) -> list[ServerReply]:
        """See AsyncRolloutClient.update_weights_from_distributed (weight_version, pause, verify, ...)."""
        return self._run(self.aio.update_weights_from_distributed(group, named_tensors, **kwargs))

    def destroy_weights_update_group(self, group: BroadcastGroup) -> list[ServerReply]:
        return self._run(self.aio.destroy_weights_update_group(group))
