"""Weight updates on every server of a client at once, with pause/continue around them and optional
verification. Mixed into AsyncRolloutClient (it supplies `servers`, `_call`, `_on_all`, `server_info`).

Updates are never retried: a first attempt may have reached a server even when its answer did not.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterable, Sequence

import msgspec

from rollout.client.broadcast_group import BroadcastGroup
from rollout.client.errors import BadRequestError, WeightUpdateError
from rollout.client.results import ServerReply

if TYPE_CHECKING:
    import torch

VERIFY_ROWS = 4  # rows per tensor compared by get_weights_by_name (a checksum would be exact; rows are cheap)


def _pick(names: Sequence[str], k: int = 3) -> list[str]:
    """First, middle and last: an update that stopped early or started late shows in one of them."""
    if len(names) <= k:
        return list(names)
    return sorted({names[0], names[len(names) // 2], names[-1]}, key=list(names).index)


def mixed_weights_error(what: str, applied: int, results: list[Any]) -> WeightUpdateError:
    """A bucket refused after `applied` accepted ones: continuing would serve a mix of old and new weights,
    so the caller leaves the servers paused and says so."""
    return WeightUpdateError(f"{what}, after {applied} bucket(s) were applied: the servers hold a mix of old and new "
                             "weights and stay paused; send a complete update, then call continue_generation(). "
                             "The bucket", results)


class WeightUpdateMixin:
    servers: list[Any]

    # --- one call on every server, collected as replies ------------------------------------------

    async def _update_on_all(self, what: str, path: str, bodies: dict[str, Any] | list[dict[str, Any]],
                             timeout: float | None | str = "default") -> list[ServerReply]:
        """POST on every server at once (one body each, or the same for all); raises WeightUpdateError with
        every server's reply if any refused (400 with its message) or failed otherwise."""
        bodies = bodies if isinstance(bodies, list) else [bodies] * len(self.servers)
        start = time.monotonic()

        async def one(server: Any, body: dict[str, Any]) -> ServerReply | BaseException:
            try:
                answer = await self._call(server, "POST", path, body, timeout=timeout)  # type: ignore[attr-defined]
            except BadRequestError as e:
                return ServerReply(server.url, False, e.message, time.monotonic() - start)
            except Exception as e:  # noqa: BLE001 - reported with the others below
                return e
            answer = answer if isinstance(answer, dict) else {}
            return ServerReply(server.url, bool(answer.get("success", True)), str(answer.get("message", "")),
                               time.monotonic() - start, answer)

        replies = await asyncio.gather(*(one(s, b) for s, b in zip(self.servers, bodies)))
        if any(isinstance(r, BaseException) or not r.success for r in replies):
            raise WeightUpdateError(what, list(replies))
        return list(replies)  # type: ignore[arg-type]

    # --- generation control ---------------------------------------------------------------------

    async def pause_generation(self, mode: str = "abort") -> list[ServerReply]:
        """mode: "abort" ends in-flight requests (partial output), "retract" frees their KV and re-runs them
        after continue, "in_place" freezes them with their KV. New requests wait until continue."""
        return await self._update_on_all("pause_generation", "/pause_generation", {"mode": mode})

    async def continue_generation(self) -> list[ServerReply]:
        return await self._update_on_all("continue_generation", "/continue_generation", {})

    @contextlib.asynccontextmanager
    async def paused(self, mode: str | None) -> AsyncIterator[None]:
        """Pause every server for the block (mode None: do nothing); continue even if the block fails."""
        if mode is None:
            yield
            return
        await self.pause_generation(mode)
        try:
            yield
        finally:
            await self.continue_generation()

    async def update_weight_version(self, new_version: str, abort_all_requests: bool = False) -> list[ServerReply]:
        return await self._update_on_all("update_weight_version", "/update_weight_version",
                                         {"new_version": new_version, "abort_all_requests": abort_all_requests})

    # --- reading weights back -------------------------------------------------------------------

    async def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list[Any]:
        """Per server, the first `truncate_size` rows (elements of a vector) of the parameter, as lists."""
        return await self._on_all("POST", "/get_weights_by_name",  # type: ignore[attr-defined]
                                  {"name": name, "truncate_size": truncate_size})

    async def _server_dtypes(self) -> list["torch.dtype"]:
        import torch

        out = []
        for info in await self.server_info():  # type: ignore[attr-defined]
            dtype, device = info.get("dtype", "auto"), info.get("device", "cpu")
            if dtype == "auto":
                out.append(torch.float32 if device == "cpu" else torch.bfloat16)
            else:
                out.append({"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
                            "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                            "fp16": torch.float16, "half": torch.float16}[dtype])
        return out

    async def verify_weights(self, expected: Iterable[tuple[str, "torch.Tensor"]], rows: int = VERIFY_ROWS) -> None:
        """Check every server holds exactly `expected` (cast to its dtype, as the update copied it) in the
        first `rows` rows of each named tensor; WeightUpdateError naming the first difference if not."""
        import torch

        expected = list(expected)
        dtypes = await self._server_dtypes()
        replies: list[ServerReply] = []
        for server, dtype in zip(self.servers, dtypes):
            problem = ""
            for name, tensor in expected:
                got = await self._call(server, "POST", "/get_weights_by_name",  # type: ignore[attr-defined]
                                       {"name": name, "truncate_size": rows})
                want = tensor.detach()[:rows].to("cpu", dtype)
                got_t = torch.tensor(got, dtype=torch.float64).to(dtype)
                if got_t.shape != want.shape or not torch.equal(got_t, want):
                    diff = (got_t.double() - want.double()).abs().max().item() if got_t.shape == want.shape else None
                    problem = (f"{name}: shape {list(got_t.shape)} vs {list(want.shape)}" if diff is None
                               else f"{name}: max |difference| {diff:.3g} in the first {rows} rows")
                    break
            replies.append(ServerReply(server.url, not problem, problem or "verified", 0.0))
        if any(not r.success for r in replies):
            raise WeightUpdateError("verify_weights", replies)

    # --- from disk ------------------------------------------------------------------------------

    async def update_weights_from_disk(self, model_path: str, *, weight_version: str | None = None,
                                       flush_cache: bool = True, load_format: str | None = None,
                                       pause: str | None = "retract", verify: bool | Sequence[str] = False,
                                       timeout: float | None | str = "default") -> list[ServerReply]:
        """Every server reloads `model_path` (a local HF checkpoint all of them can read) in place.
        `verify`: True (a few tensors) or names: read them back and compare with the checkpoint."""
        body: dict[str, Any] = {"model_path": model_path, "flush_cache": flush_cache}
        if weight_version is not None:
            body["weight_version"] = weight_version
        if load_format is not None:
            body["load_format"] = load_format
        async with self.paused(pause):
            replies = await self._update_on_all("update_weights_from_disk", "/update_weights_from_disk", body,
                                                timeout)
        if verify:
            await self.verify_weights(_checkpoint_tensors(model_path, None if verify is True else list(verify)))
        return replies

    # --- by broadcast ---------------------------------------------------------------------------

    async def init_weights_update_group(self, master_address: str = "127.0.0.1", master_port: int | None = None,
                                        *, backend: str | None = None, group_name: str = "weight_update_group",
                                        timeout: float = 120.0) -> BroadcastGroup:
        """Create the trainer's group (rank 0) and have every server join it (ranks 1..): one group for all
        servers, so one broadcast updates them all. `master_port` None picks a free port. `timeout` bounds
        the join on both sides and, on the servers, every later broadcast of the group. `backend` None:
        "nccl" when every server runs on CUDA (the trainer then broadcasts CUDA tensors), else "gloo"."""
        from sync import destroy_process_group, init_custom_process_group, tcp_init_method

        if master_port is None:
            from rollout.client.local_server import free_port
            master_port = free_port()
        infos = await self.server_info()  # type: ignore[attr-defined]
        tp = [int(info.get("tp_size", 1)) for info in infos]
        if backend is None:
            on_cuda = all(str(info.get("device", "cpu")).startswith("cuda") for info in infos)
            backend = "nccl" if on_cuda else "gloo"
        offsets = [1 + sum(tp[:i]) for i in range(len(tp))]
        world_size = 1 + sum(tp)
        bodies = [{"master_address": master_address, "master_port": master_port, "rank_offset": off,
                   "world_size": world_size, "group_name": group_name, "backend": backend, "timeout": timeout}
                  for off in offsets]
        joins = asyncio.ensure_future(self._update_on_all("init_weights_update_group", "/init_weights_update_group",
                                                          bodies, timeout=timeout + 30))
        loop = asyncio.get_running_loop()
        try:
            group = await loop.run_in_executor(None, lambda: init_custom_process_group(
                backend, tcp_init_method(master_address, master_port), world_size, 0, group_name, timeout=timeout))
        except BaseException:
            await asyncio.gather(joins, return_exceptions=True)
            raise
        try:
            await joins
        except BaseException:
            destroy_process_group(group)
            raise
        return BroadcastGroup(group, group_name, backend, world_size, master_address, master_port)

    async def update_weights_from_distributed(self, group: BroadcastGroup,
                                              named_tensors: Iterable[tuple[str, "torch.Tensor"]], *,
                                              weight_version: str | None = None, flush_cache: bool = True,
                                              bucket_bytes: int | None = None, pause: str | None = "retract",
                                              verify: bool | Sequence[str] = False,
                                              load_format: str | None = "flattened_bucket") -> list[ServerReply]:
        """Broadcast `named_tensors` (HF names) to every server of the group, in flat buckets (one request
        and one collective each). The version and the cache flush go with the last bucket, so a server never
        reports the new version before it holds every tensor. Answers the last bucket's replies.
        load_format None: one request for every tensor and one collective per tensor instead (SGLang's
        original protocol). `verify`: each request also carries the tensors' digests (CRC-32, checked by the
        server before it applies them: a corrupted transfer is refused), and afterwards a few tensors (True)
        or the named ones are read back and compared."""
        from sync import WeightSender
        from sync.sender import DEFAULT_BUCKET_BYTES

        if load_format not in ("flattened_bucket", None):
            raise ValueError(f"load_format must be 'flattened_bucket' or None, got {load_format!r}.")
        named = list(named_tensors)
        sender = WeightSender(group.process_group, bucket_bytes=bucket_bytes or DEFAULT_BUCKET_BYTES)
        by_name = dict(named)

        def digests(names: Sequence[str]) -> dict[str, Any]:
            return {"digests": sender.digests((n, by_name[n]) for n in names)} if verify else {}
        metas = sender.plan(named) if load_format else []
        loop = asyncio.get_running_loop()
        pending: list[asyncio.Future] = []

        def announce_all(specs: Any) -> None:
            # Per tensor: one request announces everything; the servers answer once every tensor is in.
            body: dict[str, Any] = {**msgspec.to_builtins(specs), "group_name": group.group_name,
                                    "flush_cache": flush_cache, **digests(specs.names)}
            if weight_version is not None:
                body["weight_version"] = weight_version
            coro = self._update_on_all(f"update_weights_from_distributed ({len(named)} tensors)",
                                       "/update_weights_from_distributed", body)
            pending.append(asyncio.run_coroutine_threadsafe(coro, loop))  # type: ignore[arg-type]

        def announce(meta: Any) -> None:
            # Runs on the broadcasting thread before each bucket goes out: the previous bucket's requests
            # must be answered first (a server takes them in order), then this bucket's are posted.
            k = len(pending)
            if pending:
                asyncio.run_coroutine_threadsafe(_wait(pending[-1]), loop).result()
            last = k == len(metas) - 1
            body: dict[str, Any] = {**msgspec.to_builtins(meta.specs()), "group_name": group.group_name,
                                    "load_format": "flattened_bucket", "flush_cache": flush_cache and last,
                                    **digests(meta.names)}
            if last and weight_version is not None:
                body["weight_version"] = weight_version
            coro = self._update_on_all(f"update_weights_from_distributed (bucket {k + 1}/{len(metas)})",
                                       "/update_weights_from_distributed", body)
            pending.append(asyncio.run_coroutine_threadsafe(coro, loop))  # type: ignore[arg-type]

        if pause is not None:
            await self.pause_generation(pause)
        mixed = False
        try:
            try:
                if load_format is None:
                    await loop.run_in_executor(None, sender.send_tensors, named, announce_all)
                else:
                    await loop.run_in_executor(None, sender.send_buckets, named, announce)
            finally:
                results = [await _wait(p, raise_errors=False) for p in pending]
            for k, r in enumerate(results):
                if isinstance(r, WeightUpdateError) and k > 0 and pause is not None:
                    # Earlier buckets are in (a server that received into its weights says so itself; one
                    # that buffers refused only this bucket).
                    mixed = True
                    raise mixed_weights_error(f"update_weights_from_distributed (bucket {k + 1}/{len(results)})", k,
                                              r.results) from None
                if isinstance(r, BaseException):
                    raise r
        finally:
            if pause is not None and not mixed:
                await self.continue_generation()
        if verify:
            chosen = set(_pick([n for n, _ in named]) if verify is True else verify)
            await self.verify_weights([(n, t) for n, t in named if n in chosen])
        return results[-1] if results else []

    async def destroy_weights_update_group(self, group: BroadcastGroup) -> list[ServerReply]:
        """Servers leave the group, then the trainer drops its end (also when a server refuses)."""
        from sync import destroy_process_group

        if group.destroyed:
            return []
        try:
            return await self._update_on_all("destroy_weights_update_group", "/destroy_weights_update_group",
                                             {"group_name": group.group_name})
        finally:
            group.destroyed = True
            destroy_process_group(group.process_group)


async def _wait(fut: Any, raise_errors: bool = True) -> Any:
    """Await a concurrent.futures.Future (from run_coroutine_threadsafe) from the loop."""
    try:
        return await asyncio.wrap_future(fut)
    except BaseException as e:
        if raise_errors:
            raise
        return e


def _checkpoint_tensors(model_path: str, names: list[str] | None) -> list[tuple[str, "torch.Tensor"]]:
    """The named tensors (or a few picked) of a local safetensors checkpoint, read lazily."""
    import glob
    import os

    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    where: dict[str, str] = {}
    for f in files:
        with safe_open(f, "pt") as st:
            where.update({k: f for k in st.keys()})
    chosen = names if names is not None else _pick(sorted(where))
    out = []
    for name in chosen:
        with safe_open(where[name], "pt") as st:
            out.append((name, st.get_tensor(name)))
    return out
