"""`EngineClient`: the HTTP process's client of the engine process: tokenizer, in-flight requests, and
the two sockets to the engine.

One `GenerateCall` per /generate call holds a ResponseBuilder per sample (prompt-major) and one asyncio
event; the receive loop applies each RequestOutput delta to its builder and wakes the call (at every
step for a stream, once every sample is finished otherwise). Control messages share the request queue,
so the engine answers them in order; their results come back by id (or in order, for flush).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import zmq
import zmq.asyncio
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from rollout.server.engine_process import EngineProcess
from rollout.server.incremental_stream import IncrementalStream
from rollout.server.ipc import InputCodec, OutputCodec, configure
from rollout.server.metrics import RequestClock, ServerMetrics
from rollout.server.text_codec import INLINE_CHARS, TextCodec, total_chars
from runtime.generate_input import GenerateInput, NormalizedGenerate, check_routed_experts, normalize_generate
from runtime.models.moe_layout import moe_layout
from runtime.messages import (AbortRequest, AbortRequestsExact, ControlResult, EmbedRequest, EngineFailed, EngineReady,
                              EngineState,
                              FlushCacheRequest, FlushCacheResult, GenerateRequest, HealthCheckRequest,
                              HealthCheckResult, RequestOutput, ServerStateRequest, ServerStateResult)
from runtime.response import ResponseBuilder
from runtime.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# After the engine process dies, how long this process keeps answering (503 with the reason, so clients and
# health checks learn why) before it exits non-zero for its supervisor to restart it.
EXIT_AFTER_ENGINE_DEATH_S = 1.0


class EngineUnavailable(Exception):
    """The engine is not ready, has died, or did not answer in time: HTTP 503 (`status`)."""

    status = 503


class EngineRequestFailed(EngineUnavailable):
    """The engine ended a request with a 5xx finish reason (`status_code` 503: the weights are unusable;
    500: the scheduler hit a bug): the whole call answers that status with the reason."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def engine_exit_reason(code: int | None) -> str:
    """"The engine process was killed by SIGKILL." / "... exited with code 1." from a Process.exitcode."""
    if code is None:
        return "The engine process is gone (its exit status is unknown)."
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (a memory-mapped file that shrank, or a crash in native code)" if name == "SIGBUS" else ""
        return f"The engine process was killed by {name}{hint}."
    return f"The engine process exited with code {code}."


class QueueFull(Exception):
    """Too many samples waiting or running (--max-queued-requests): HTTP 429 with Retry-After."""


class ClientDisconnected(Exception):
    """The client of a call went away; its samples were aborted in the engine."""


@dataclass(eq=False)
class GenerateCall:
    """One /generate call: its samples in answer order and what the client has not seen yet."""

    builders: list[ResponseBuilder]
    is_batch: bool
    stream: bool
    event: asyncio.Event = field(default_factory=asyncio.Event)
    remaining: int = 0
    dirty: list[int] = field(default_factory=list)   # indices updated since the last chunk (stream)
    error: str | None = None                         # set when the engine died under the call
    failure: tuple[int, str] | None = None           # (HTTP status, reason): a sample ended with a 5xx abort
    disconnected: bool = False                       # set when the client went away

    @property
    def rids(self) -> list[str]:
        return [b.req.rid for b in self.builders]

    @property
    def finished(self) -> bool:
        return self.remaining == 0


@dataclass(eq=False)
class _Slot:
    call: GenerateCall
    index: int
    abandoned: bool = False   # the client left; the slot stays until the engine confirms the abort
    clock: RequestClock | None = None   # with --enable-metrics, for requests that log metrics


class EngineClient:
    def __init__(self, args: Any):
        self.args = args
        self.tokenizer: PreTrainedTokenizerBase | None = None
        if not args.skip_tokenizer_init:
            self.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path or args.model_path)
        self.codec: TextCodec | None = None
        if self.tokenizer is not None:
            self.codec = TextCodec(self.tokenizer, args.tokenizer_path or args.model_path)
        self.max_queued: int | None = getattr(args, "max_queued_requests", None)
        self.hf_config = AutoConfig.from_pretrained(args.model_path)
        self.moe_layout = moe_layout(self.hf_config, args.is_embedding)  # None: dense (no routed experts)
        self.weight_version = args.weight_version
        self.model_path = args.model_path                # the checkpoint last loaded from disk, as sent
        self.unusable: str | None = None                 # why the weights cannot serve (503), from the engine
        self.paused = False
        self.info: EngineReady | None = None
        self.ready: asyncio.Event | None = None          # created in start(), inside the event loop
        self.dead_reason: str | None = None
        self.failed: str | None = None                   # the engine's scheduler hit a bug (EngineState)
        self.on_fatal = lambda: None                     # the launcher stops uvicorn
        self.engine: EngineProcess | None = None
        self.metrics: ServerMetrics | None = None        # set by the app with --enable-metrics
        self._slots: dict[str, _Slot] = {}
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._flush_waiters: deque[asyncio.Future] = deque()
        self._in_codec, self._out_codec = InputCodec(), OutputCodec()
        self._ctx: zmq.asyncio.Context | None = None
        self._push: zmq.Socket | None = None
        self._pull: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task] = []
        self.started_at = time.time()

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self, engine: EngineProcess) -> None:
        """Bind the sockets, watch the engine process, and wait (in the background) for it to be ready."""
        self.engine = engine
        self.ready = asyncio.Event()
        self._ctx = zmq.asyncio.Context()
        # Sends never block (no high-water mark), so a plain socket works from the event loop and
        # costs no await; receives go through the asyncio socket.
        self._push = configure(zmq.Context.instance().socket(zmq.PUSH))
        self._push.bind(engine.addresses.to_engine)
        self._pull = configure(self._ctx.socket(zmq.PULL))
        self._pull.bind(engine.addresses.from_engine)
        loop = asyncio.get_running_loop()
        loop.add_reader(engine.sentinel, self._on_engine_exit)
        self._tasks.append(asyncio.create_task(self._receive_loop(), name="engine-receive"))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.engine is not None and self.engine.process is not None:
            try:
                asyncio.get_running_loop().remove_reader(self.engine.sentinel)
            except (ValueError, OSError):
                pass
        for sock in (self._push, self._pull):
            if sock is not None:
                sock.close(linger=0)
        if self.codec is not None:
            self.codec.close()

    def _on_engine_exit(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.engine.sentinel)
        code = self.engine.reap()  # waitpid: no zombie left behind
        self._fail(engine_exit_reason(code))
        if self.info is not None:  # answered every waiting call above; let health checks see why, then exit
            loop.call_later(EXIT_AFTER_ENGINE_DEATH_S, self.on_fatal)

    def _fail(self, reason: str) -> None:
        """The engine is gone: every waiting call ends with the reason, every later route answers 503."""
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        if self.info is None:
            logger.error("%s The server exits: the engine never became ready.", reason)
        else:
            logger.error("%s The server answers 503 and exits in %.0f s.", reason, EXIT_AFTER_ENGINE_DEATH_S)
        for slot in list(self._slots.values()):
            slot.call.error = reason
            slot.call.event.set()
        self._slots.clear()
        for fut in list(self._pending.values()) + list(self._flush_waiters):
            if not fut.done():
                fut.set_exception(EngineUnavailable(reason))
        self._pending.clear()
        self._flush_waiters.clear()
        if self.info is None:  # it died while starting: nothing will ever be served
            self.on_fatal()

    def check_available(self) -> None:
        if self.dead_reason is not None:
            raise EngineUnavailable(self.dead_reason)
        if self.failed is not None:
            raise EngineUnavailable(self.failed)
        if self.info is None:
            raise EngineUnavailable("The server is starting: the model is still loading.")

    # --- engine -> front end --------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        while True:
            frame = await self._pull.recv(copy=True)
            try:
                outputs = self._out_codec.decode(frame)
            except Exception:
                logger.exception("Dropped an undecodable frame from the engine")
                continue
            for out in outputs:
                try:
                    self._dispatch(out)
                except Exception:  # our bug: log, keep the loop (and every other request) alive
                    logger.exception("Failed to handle %s from the engine", type(out).__name__)

    def _dispatch(self, out: Any) -> None:
        if isinstance(out, RequestOutput):
            slot = self._slots.get(out.rid)
            if slot is None:
                return
            call = slot.call
            if not slot.abandoned:
                call.builders[slot.index].add(out)
            if slot.clock is not None:
                self.metrics.on_output(slot.clock, len(out.new_token_ids), out.finished, out.prompt_tokens,
                                       out.cached_tokens)
            status = (out.finish_reason or {}).get("status_code") if out.finished else None
            if isinstance(status, int) and status >= 500 and call.failure is None:
                call.failure = (status, str(out.finish_reason.get("message", "")))
            if out.finished:
                del self._slots[out.rid]
                call.remaining -= 1
            if call.stream:
                call.dirty.append(slot.index)
                call.event.set()
            elif call.remaining == 0:
                call.event.set()
        elif isinstance(out, (HealthCheckResult, ServerStateResult, ControlResult)):
            if isinstance(out, ControlResult):  # the engine's state after the control message, in order
                self.weight_version = out.weight_version
                self.unusable = out.unusable
                self.paused = out.paused
                if out.report is not None and out.success and self.metrics is not None:
                    self.metrics.on_weight_update(out.report)
            fut = self._pending.pop(out.id, None)
            if fut is not None and not fut.done():
                fut.set_result(out)
        elif isinstance(out, FlushCacheResult):
            # One result per FlushCacheRequest, in order: the oldest waiter's, even if it gave up.
            if self._flush_waiters:
                fut = self._flush_waiters.popleft()
                if not fut.done():
                    fut.set_result(out)
        elif isinstance(out, EngineState):
            self.weight_version = out.weight_version
            self.unusable = out.unusable
            self.paused = out.paused
            if out.failed is not None and self.failed is None:
                self.failed = out.failed
                logger.error("The engine failed: %s /health answers 503 from now on.", out.failed)
            elif out.unusable is not None:
                logger.error("Weights unusable: %s", out.unusable)
        elif isinstance(out, EngineReady):
            self.info = out
            self.weight_version = out.weight_version
            self.ready.set()
            logger.info("Engine ready: %s, vocab %d, context %d, KV pool %d tokens.", out.device,
                        out.vocab_size, out.context_len, out.max_total_num_tokens)
        elif isinstance(out, EngineFailed):
            self._fail(f"The engine failed: {out.message}")

    # --- front end -> engine --------------------------------------------------------------------

    def _send(self, messages: list) -> None:
        self._push.send(self._in_codec.encode(messages), copy=False)

    async def _control(self, message_cls: type, timeout: float, /, **fields: Any) -> Any:
        self.check_available()
        msg_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        self._send([message_cls(id=msg_id, **fields)])
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise EngineUnavailable(f"The engine did not answer within {timeout:g} s.") from None
        finally:
            self._pending.pop(msg_id, None)

    # --- generation -----------------------------------------------------------------------------

    def normalize(self, inp: GenerateInput) -> NormalizedGenerate:
        """Tokenize and check a /generate call (blocking: big inputs run it on the codec's threads)."""
        self.check_available()
        tokenize = None
        if self.codec is not None:
            self.check_text_length(inp.text)
            tokenize = self.codec.encode
        check_routed_experts(inp, self.moe_layout is not None)
        return normalize_generate(inp, tokenize, self.info.vocab_size, self.info.context_len)

    async def normalize_async(self, inp: GenerateInput) -> NormalizedGenerate:
        """`normalize`, with big texts tokenized in the tokenizer process and big checks on a thread, so
        the event loop keeps serving."""
        size = total_chars(inp.text) + (len(inp.input_ids) if isinstance(inp.input_ids, list) else 0)
        if size <= INLINE_CHARS:
            return self.normalize(inp)
        if self.codec is None:  # --skip-tokenizer-init: only token ids to check, on a thread if many
            return await asyncio.to_thread(self.normalize, inp)
        text = inp.text
        self.check_text_length(text)  # refuse by length before paying for a tokenizer
        texts = text if isinstance(text, list) else [text]
        if inp.input_ids is None and texts and all(isinstance(t, str) for t in texts):
            ids = await self.codec.encode_many(texts)
            # The same call by token ids: normalize_generate treats both alike from here on.
            inp = dataclasses.replace(inp, text=None, input_ids=ids if isinstance(text, list) else ids[0])
        return await self.codec.run(size, self.normalize, inp)

    def check_text_length(self, text: Any) -> None:
        """A text longer than the context times the longest token cannot fit: ValueError without tokenizing."""
        if self.codec is None or self.info is None:
            return
        cap = self.info.context_len * self.codec.max_chars_per_token
        texts = text if isinstance(text, list) else [text]
        for i, t in enumerate(texts):
            if isinstance(t, str) and len(t) > cap:
                where = f"text[{i}]" if isinstance(text, list) else "text"
                raise ValueError(f"{where} has {len(t)} characters: more than the model's context length "
                                 f"({self.info.context_len} tokens) can hold (at most "
                                 f"{self.codec.max_chars_per_token} characters a token), so it is refused "
                                 "without tokenizing.")

    def admit(self, count: int) -> None:
        """QueueFull when `count` more samples would pass --max-queued-requests (waiting + running)."""
        if self.max_queued is None:
            return
        if count > self.max_queued:
            raise ValueError(f"The call asks for {count} samples, more than this server ever queues "
                             f"(--max-queued-requests {self.max_queued}); split it.")
        if len(self._slots) + count > self.max_queued:
            raise QueueFull(f"The server is full: {len(self._slots)} samples are waiting or running and the call "
                            f"adds {count}, over --max-queued-requests {self.max_queued}. Retry later.")

    def submit(self, norm: NormalizedGenerate, return_text_in_logprobs: bool, stream: bool,
               start_time: float, log_metrics: bool = True, admit: bool = True) -> GenerateCall:
        """Register the call's samples and send them; ValueError for an rid already in flight."""
        builders = [ResponseBuilder(r, self.tokenizer, return_text_in_logprobs, start_time) for r in norm.requests]
        return self.submit_builders(builders, norm.is_batch, stream, log_metrics, start_time, admit)

    def submit_builders(self, builders: list[Any], is_batch: bool, stream: bool = False, log_metrics: bool = True,
                        start_time: float | None = None, admit: bool = True) -> GenerateCall:
        """Send each builder's request (`builder.req`); builders are ResponseBuilders or anything with
        the same add / finished / to_dict (runtime/scoring_output.py's ScoringCollector).
        With `admit`, QueueFull past --max-queued-requests (health checks pass admit=False)."""
        self.check_available()
        if self.unusable is not None:
            raise EngineUnavailable(self.unusable)
        if admit:
            self.admit(len(builders))
        for b in builders:
            if b.req.rid in self._slots:
                raise ValueError(f"Duplicate request ID rid={b.req.rid!r}: a request with it is still running.")
        call = GenerateCall(builders=builders, is_batch=is_batch, stream=stream, remaining=len(builders))
        timed = self.metrics is not None and log_metrics
        start = start_time if start_time is not None else time.monotonic()
        for i, b in enumerate(builders):
            self._slots[b.req.rid] = _Slot(call, i, clock=self.metrics.start_request(start) if timed else None)
        self._send([b.req for b in builders])
        return call

    def abandon(self, call: GenerateCall) -> None:
        """The client left: abort the call's unfinished samples in the engine (frees their KV)."""
        rids = [rid for rid in call.rids if (slot := self._slots.get(rid)) is not None and slot.call is call]
        if not rids:
            return
        for rid in rids:
            self._slots[rid].abandoned = True
        if self.dead_reason is None:
            self._send([AbortRequestsExact(rids=rids)])

    def disconnect(self, call: GenerateCall) -> None:
        """The client of a call disconnected: abort it and wake whoever waits on it."""
        if call.finished:
            return
        self.abandon(call)
        call.disconnected = True
        call.event.set()

    async def _next_event(self, call: GenerateCall) -> None:
        """Wait until the engine sent something for the call; raise if it died or the client left."""
        await call.event.wait()
        call.event.clear()
        if call.error is not None:
            raise EngineUnavailable(call.error)
        if call.disconnected:
            raise ClientDisconnected()

    async def wait(self, call: GenerateCall) -> list[dict]:
        """Every sample's final answer, in order (non-streaming); EngineRequestFailed when a sample ended
        with a 5xx abort (the weights became unusable, the scheduler failed)."""
        while not call.finished:
            await self._next_event(call)
        if call.failure is not None:
            raise EngineRequestFailed(call.failure[1], call.failure[0])
        return [b.to_dict() for b in call.builders]

    async def stream(self, call: GenerateCall) -> AsyncIterator[dict]:
        """Cumulative chunks: one per sample that changed since the last chunk, as the engine steps.

        Several steps' outputs that arrive before the client reads are coalesced into one chunk. With
        --incremental-streaming-output a chunk carries only what is new since the sample's previous chunk."""
        incremental = IncrementalStream() if self.args.incremental_streaming_output else None
        while True:
            await self._next_event(call)
            if call.failure is not None:
                raise EngineRequestFailed(call.failure[1], call.failure[0])
            dirty, call.dirty = call.dirty, []
            seen: set[int] = set()
            for i in dirty:
                if i in seen:
                    continue
                seen.add(i)
                chunk = call.builders[i].to_dict()
                if incremental is not None:
                    chunk = incremental.delta(i, chunk, call.builders[i].finished)
                if call.is_batch:
                    chunk["index"] = i
                yield chunk
            if call.finished and not call.dirty:
                return

    def abort(self, rid: str, abort_all: bool, message: str | None = None) -> None:
        self.check_available()
        if message is None:
            self._send([AbortRequest(rid=rid, abort_all=abort_all)])
        else:  # AbortRequest carries no message: name the rids exactly
            rids = list(self._slots) if abort_all else [r for r in self._slots if r.startswith(rid)]
            self._send([AbortRequestsExact(rids=rids, message=message)])

    # --- control --------------------------------------------------------------------------------

    async def flush_cache(self, timeout: float) -> FlushCacheResult:
        """Flush when the engine is idle; with a timeout, retry until it is or the time is up."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_available()
            fut = asyncio.get_running_loop().create_future()
            self._flush_waiters.append(fut)
            self._send([FlushCacheRequest()])
            try:
                result = await asyncio.wait_for(fut, max(timeout, 0) + 30.0)
            except asyncio.TimeoutError:
                raise EngineUnavailable("The engine did not answer the flush request.") from None
            if result.success or time.monotonic() >= deadline:
                return result
            await asyncio.sleep(min(0.05, max(deadline - time.monotonic(), 0)))

    async def control(self, message_cls: type, wait_s: float, /, **fields: Any) -> ControlResult:
        """Send a weight-update or generation-control message; its ControlResult, in queue order."""
        return await self._control(message_cls, wait_s, **fields)

    async def health(self, timeout: float) -> None:
        result = await self._control(HealthCheckRequest, timeout)
        if result.error is not None:
            self.failed = self.failed or result.error
            raise EngineUnavailable(result.error)

    async def server_state(self, timeout: float) -> dict:
        result = await self._control(ServerStateRequest, timeout)
        state = dict(result.state)
        state["num_frontend_reqs"] = len(self._slots)
        return state

    async def health_generate(self, timeout: float) -> None:
        """Generate one token through the whole path."""
        self.check_available()
        rid = f"HEALTH_CHECK_{next(self._ids)}_{time.monotonic_ns()}"
        if self.args.is_embedding:  # a scoring model generates nothing: score one token instead
            from runtime.scoring_output import ScoringCollector
            call = self.submit_builders([ScoringCollector(EmbedRequest(rid=rid, input_ids=[0]))], False,
                                        log_metrics=False, admit=False)
        else:
            req = GenerateRequest(rid=rid, input_ids=[0],
                                  sampling_params=SamplingParams(max_new_tokens=1, temperature=0.0))
            call = self.submit(NormalizedGenerate(is_batch=False, requests=[req]), False, False, time.monotonic(),
                               log_metrics=False, admit=False)
        try:
            await asyncio.wait_for(self.wait(call), timeout)
        except asyncio.TimeoutError:
            self.abandon(call)
            raise EngineUnavailable(f"The engine did not generate a token within {timeout:g} s.") from None

    # --- info -----------------------------------------------------------------------------------

    def model_info(self) -> dict:
        return {
            "model_path": self.model_path,
            "tokenizer_path": self.args.tokenizer_path or self.args.model_path,
            "is_generation": not self.args.is_embedding,
            "preferred_sampling_params": None,
            "weight_version": self.weight_version,
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": getattr(self.hf_config, "model_type", None),
            "architectures": list(getattr(self.hf_config, "architectures", None) or []) or None,
        }

    @property
    def num_in_flight(self) -> int:
        return len(self._slots)
