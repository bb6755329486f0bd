"""AsyncRolloutClient: what a trainer uses to drive one or many rollout servers (asyncio).

    client = AsyncRolloutClient(["http://127.0.0.1:30000", "http://127.0.0.1:30001"])
    await client.wait_until_ready()
    groups = await client.generate(prompt_ids, {"max_new_tokens": 32}, n=4, return_logprob=True)
    groups[i][j].output_ids, .output_logprobs, .finish_reason, .output_weight_versions, .cached_tokens

Each prompt's n samples go to one server in one request (they share its prefix cache); prompts spread
over the servers by least outstanding samples. HTTP runs on `requests` in a thread pool, so the same
code serves the synchronous RolloutClient (rollout/client/rollout_client.py) without a second implementation.

Behind sglang-router, generation and scoring go through the router (its policy places them) and every
control call (weight updates, pause / continue, flush, abort, info) goes to each worker directly:

    client = AsyncRolloutClient("http://router:30000", workers=["http://w1:30000", "http://w2:30000"])
    client = AsyncRolloutClient.from_router("http://router:30000")   # workers read from GET /workers

A server that dies mid-request: each generate / score request it held is resent once, at most, to another
server (or through the router, with RetryPolicy.retry_server_error), so it may run twice on the servers but
its answer reaches the caller once; lost a second time, it reaches the caller as the error (RetryPolicy).
`resends` counts them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import time
from typing import Any, Sequence

from tqdm.auto import tqdm

from rollout.client.balancer import Balancer
from rollout.client.errors import ConnectionFailedError, RolloutError, ServerError, ServiceUnavailableError
from rollout.client.results import EncodeResult, GenerateResult, ServerReply
from rollout.client.retry_policy import NO_RETRY, RetryPolicy
from rollout.client.router import discover_workers
from rollout.client.server_connection import ServerConnection
from rollout.client.tensor_updates import TensorUpdateMixin

DOWN_S = 2.0  # a server that refused a connection is avoided this long while others are up


class AsyncRolloutClient(TensorUpdateMixin):
    def __init__(self, urls: str | Sequence[str], *, workers: Sequence[str] | None = None,
                 api_key: str | None = None, max_concurrency: int = 64, timeout: float | None = 600.0,
                 connect_timeout: float = 5.0, retry: RetryPolicy = RetryPolicy(), progress_min: int = 256):
        """`urls`: the rollout servers, or with `workers` the router(s) in front of them; `workers`: the
        servers behind the router(s), which every control call reaches directly. `max_concurrency`:
        requests in flight at once over all servers (generate / score chunks); `timeout`: seconds to wait
        for one answer (None: forever), per call overridable; `progress_min`: batches of at least this many
        prompts show a progress bar unless `progress=False`."""
        urls = [urls] if isinstance(urls, str) else list(urls)
        if workers is not None and not workers:
            raise ValueError("workers=[] names no server; pass the router's workers or use from_router().")

        def connect(u: str) -> ServerConnection:
            return ServerConnection(u, api_key=api_key, pool_size=max_concurrency + 8, connect_timeout=connect_timeout)

        self.servers = [connect(u) for u in (urls if workers is None else workers)]  # control calls: each one
        self.routers = [] if workers is None else [connect(u) for u in urls]
        self.balancer = Balancer(self.routers or self.servers)                         # generation and scoring
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.retry = retry
        self.progress_min = progress_min
        self.resends = 0  # requests resent after their server was lost mid-request (RetryPolicy: once each)
        # Threads do the blocking HTTP; control calls get headroom beyond the generation limit.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_concurrency + 4 * (len(self.servers) + len(self.routers)) + 8, thread_name_prefix="rollout-client")
        self._semaphores: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}

    @classmethod
    def from_router(cls, router_url: str, **options: Any) -> "AsyncRolloutClient":
        """A client of the workers an sglang-router lists (GET /workers), generating through the router."""
        workers = discover_workers(router_url, api_key=options.get("api_key"),
                                   timeout=options.get("connect_timeout", 5.0) + 5.0)
        return cls(router_url, workers=workers, **options)

    @property
    def urls(self) -> list[str]:
        """The servers (the workers, behind a router)."""
        return [s.url for s in self.servers]

    @property
    def router_urls(self) -> list[str]:
        return [s.url for s in self.routers]

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        for s in self.servers + self.routers:
            s.close()

    async def __aenter__(self) -> "AsyncRolloutClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def replace_worker(self, old_url: str, new_url: str) -> None:
        """A server that took the place of `old_url` (a fleet replaced a lost one elsewhere): later control
        calls, and without a router generation too, go to `new_url`. Requests in flight are not touched."""
        old_url, new_url = old_url.rstrip("/"), new_url.rstrip("/")
        index = self.urls.index(old_url)  # ValueError naming old_url if the client has no such server
        old = self.servers[index]
        new = ServerConnection(new_url, api_key=old.api_key, pool_size=old.pool_size,
                               connect_timeout=old.connect_timeout)
        self.servers = self.servers[:index] + [new] + self.servers[index + 1:]  # one assignment: no torn list
        if not self.routers:
            self.balancer.replace(old, new)
        old.close()

    # --- plumbing -------------------------------------------------------------------------------

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()  # one per loop: a semaphore is bound to the loop that uses it
        if loop not in self._semaphores:
            self._semaphores[loop] = asyncio.Semaphore(self.max_concurrency)
        return self._semaphores[loop]

    def _timeout(self, timeout: float | None | str) -> float | None:
        return self.timeout if timeout == "default" else timeout  # type: ignore[return-value]

    async def _call(self, server: ServerConnection, method: str, path: str, body: dict[str, Any] | None = None,
                    *, timeout: float | None | str = "default", retry: RetryPolicy = NO_RETRY,
                    params: dict[str, Any] | None = None) -> Any:
        fn = functools.partial(server.call, method, path, body, timeout=self._timeout(timeout), retry=retry,
                               params=params)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def _on_all(self, method: str, path: str, body: dict[str, Any] | None = None, *,
                      timeout: float | None | str = "default", retry: RetryPolicy = NO_RETRY) -> list[Any]:
        """The same call on every server at once; the first error is raised after all have answered."""
        results = await asyncio.gather(*(self._call(s, method, path, body, timeout=timeout, retry=retry)
                                         for s in self.servers), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results

    async def _balanced(self, path: str, body: dict[str, Any], weight: int,
                        timeout: float | None | str) -> tuple[ServerConnection, Any]:
        """One idempotent call on the least loaded server; a refused connection or a 503 is retried with
        backoff, on another server when there is one. A request that may have run (its connection dropped
        mid-request; a router's 5xx with retry_server_error) is resent once at most (RetryPolicy)."""
        failed: ServerConnection | None = None
        attempt = 0
        resent = False
        while True:
            server = self.balancer.acquire(weight, avoid=failed)
            try:
                return server, await self._call(server, "POST", path, body, timeout=timeout)
            except (ConnectionFailedError, ServiceUnavailableError) as e:
                server.mark_down(DOWN_S)
                if isinstance(e, ConnectionFailedError) and e.sent:  # it may have run: resent once at most
                    if resent or self.retry.retries == 0:
                        raise
                    resent = True
                    self.resends += 1
                elif attempt >= self.retry.retries:  # it never ran
                    raise
                failed = server if len(self.balancer.servers) > 1 else None
            except ServerError as e:
                # Behind a router, a 5xx is a worker lost mid-request (RetryPolicy.retry_server_error).
                if not self.retry.retry_server_error or resent or e.status < 500:
                    raise
                resent = True
                self.resends += 1
                failed = None
            finally:
                server.release(weight)
            await asyncio.sleep(self.retry.delay(attempt))
            attempt += 1

    async def _gather_limited(self, coros: list[Any], progress: tqdm | None) -> list[Any]:
        """Run under the concurrency limit, in order; on the first failure the rest are cancelled."""
        sem = self._semaphore()

        async def limited(coro: Any) -> Any:
            async with sem:
                result = await coro
            if progress is not None:
                progress.update(1)
            return result

        tasks = [asyncio.ensure_future(limited(c)) for c in coros]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            if progress is not None:
                progress.close()

    def _progress(self, total: int, progress: bool | None, desc: str) -> tqdm | None:
        show = total >= self.progress_min if progress is None else progress
        return tqdm(total=total, desc=desc, unit="prompt") if show else None

    # --- generation -----------------------------------------------------------------------------

    async def generate(self, prompts: Sequence[Any], sampling_params: dict[str, Any] | Sequence[dict] | None = None,
                       *, n: int | None = None, return_logprob: bool = False, logprob_start_len: int = -1,
                       top_logprobs_num: int = 0, rid: str | None = None, timeout: float | None | str = "default",
                       progress: bool | None = None, **extra: Any) -> list[list[GenerateResult]]:
        """Generate for a batch of prompts (each a list of token ids or a str); answers one list of n
        samples per prompt, in order. `sampling_params` is one dict for all or one per prompt; `n`
        overrides its "n". `rid`: prompt i gets rid f"{rid}_{i}" (its samples f"{rid}_{i}_{j}"), so
        `abort(rid)` ends them. `extra`: more /generate fields (token_ids_logprob, ...)."""
        if isinstance(prompts, (str, bytes)) or (prompts and isinstance(prompts[0], int)):
            raise TypeError("generate takes a batch: a list of prompts (str or list of token ids).")
        per_prompt = sampling_params if isinstance(sampling_params, (list, tuple)) else None
        if per_prompt is not None and len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} sampling_params for {len(prompts)} prompts.")

        async def one(i: int, prompt: Any) -> list[GenerateResult]:
            sp = dict(per_prompt[i] if per_prompt is not None else sampling_params or {})
            if n is not None:
                sp["n"] = n
            body: dict[str, Any] = {"text" if isinstance(prompt, str) else "input_ids": prompt,
                                    "sampling_params": sp, "return_logprob": return_logprob, **extra}
            if logprob_start_len != -1:
                body["logprob_start_len"] = logprob_start_len
            if top_logprobs_num:
                body["top_logprobs_num"] = top_logprobs_num
            if rid is not None:
                body["rid"] = f"{rid}_{i}"
            server, answer = await self._balanced("/generate", body, int(sp.get("n", 1)), timeout)
            samples = answer if isinstance(answer, list) else [answer]
            return [GenerateResult.from_json(d, i, j, server.url) for j, d in enumerate(samples)]

        bar = self._progress(len(prompts), progress, "generate")
        return await self._gather_limited([one(i, p) for i, p in enumerate(prompts)], bar)

    # --- scoring --------------------------------------------------------------------------------

    async def _encode(self, path: str, inputs: Sequence[Any], batch_size: int, timeout: float | None | str,
                      progress: bool | None) -> list[EncodeResult]:
        chunks = [list(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)]

        async def one(chunk: list[Any]) -> list[EncodeResult]:
            body = {"text" if isinstance(chunk[0], str) else "input_ids": chunk}
            server, answer = await self._balanced(path, body, len(chunk), timeout)
            return [EncodeResult.from_json(d, server.url) for d in answer]

        bar = self._progress(len(chunks), progress, path.strip("/"))
        return [r for part in await self._gather_limited([one(c) for c in chunks], bar) for r in part]

    async def encode(self, inputs: Sequence[Any], *, batch_size: int = 32, timeout: float | None | str = "default",
                     progress: bool | None = None) -> list[EncodeResult]:
        """Embeddings (a server run with --is-embedding) of texts or token-id lists, in order."""
        return await self._encode("/encode", inputs, batch_size, timeout, progress)

    async def classify(self, inputs: Sequence[Any], *, batch_size: int = 32,
                       timeout: float | None | str = "default", progress: bool | None = None) -> list[EncodeResult]:
        """Reward-model outputs (`.reward` is embedding[0]) of texts or token-id lists, in order."""
        return await self._encode("/classify", inputs, batch_size, timeout, progress)

    async def score(self, query: str | list[int], items: Sequence[Any], label_token_ids: list[int], *,
                    apply_softmax: bool = False, item_first: bool = False, batch_size: int = 64,
                    timeout: float | None | str = "default") -> list[list[float]]:
        """/v1/score: per item, the probability of each label token after query+item (or item+query)."""
        chunks = [list(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]

        async def one(chunk: list[Any]) -> list[list[float]]:
            body = {"query": query, "items": chunk, "label_token_ids": label_token_ids,
                    "apply_softmax": apply_softmax, "item_first": item_first}
            _, answer = await self._balanced("/v1/score", body, len(chunk), timeout)
            return answer["scores"]

        return [s for part in await self._gather_limited([one(c) for c in chunks], None) for s in part]

    # --- health, info, cache, abort -------------------------------------------------------------

    async def health(self, timeout: float = 10.0) -> dict[str, bool]:
        """url -> whether /health answered 200 (never raises for a down server); routers included."""
        endpoints = self.servers + self.routers
        results = await asyncio.gather(*(self._call(s, "GET", "/health", timeout=timeout) for s in endpoints),
                                       return_exceptions=True)
        return {s.url: not isinstance(r, BaseException) for s, r in zip(endpoints, results)}

    async def wait_until_ready(self, timeout: float = 300.0, poll_s: float = 0.2) -> None:
        """Until every server's /health answers 200 (its model is loaded); TimeoutError naming the rest."""
        deadline = time.monotonic() + timeout
        while True:
            state = await self.health(timeout=min(10.0, max(deadline - time.monotonic(), 0.5)))
            if all(state.values()):
                return
            if time.monotonic() >= deadline:
                down = [u for u, ok in state.items() if not ok]
                raise TimeoutError(f"Not ready within {timeout:g} s: {', '.join(down)}")
            await asyncio.sleep(poll_s)

    async def model_info(self) -> list[dict[str, Any]]:
        return await self._on_all("GET", "/get_model_info", retry=self.retry)

    async def server_info(self) -> list[dict[str, Any]]:
        return await self._on_all("GET", "/get_server_info", retry=self.retry)

    async def flush_cache(self, timeout: float = 0.0) -> list[ServerReply]:
        """Drop every server's prefix cache; waits up to `timeout` s for a busy server to go idle, then
        raises BadRequestError with the server's message."""
        start = time.monotonic()
        answers = await self._on_all("POST", "/flush_cache", {"timeout": timeout}, retry=self.retry)
        return [ServerReply(s.url, True, str(a).strip(), time.monotonic() - start)
                for s, a in zip(self.servers, answers)]

    async def abort(self, rid: str | None = None) -> None:
        """Abort requests whose rid starts with `rid` on every server; all of them when rid is None."""
        body = {"abort_all": True} if rid is None else {"rid": rid}
        await self._on_all("POST", "/abort_request", body)

    def __repr__(self) -> str:
        if self.routers:
            return f"{type(self).__name__}({self.router_urls}, workers={self.urls})"
        return f"{type(self).__name__}({self.urls})"


__all__ = ["AsyncRolloutClient", "RolloutError"]
