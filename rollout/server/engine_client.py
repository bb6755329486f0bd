"""`EngineClient`: the HTTP process's client of the engine process, the one object routes talk to.

It holds the tokenizer and the model's config, and composes the parts, one noun a file:
- `EngineLink` (engine_link.py): the two sockets to the engine;
- `EngineStatus` (engine_status.py): ready / dead / failed / paused / weights unusable;
- `RequestTable` (request_table.py): the samples in flight, by rid, and the queue limit;
- `GenerateCall` (generate_call.py): one call's samples, read as a whole answer or as stream chunks;
- `ControlChannel` (control_channel.py): control messages and the futures that wait for their answers;
- `GenerateNormalizer` (generate_normalizer.py): a /generate call tokenized and checked.
Its receive loop hands each engine output to the part it concerns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Sequence

from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from rollout.server.control_channel import ControlChannel
from rollout.server.engine_errors import (ClientDisconnected, EngineRequestFailed, EngineUnavailable, QueueFull,
                                          engine_exit_reason)
from rollout.server.engine_link import EngineLink
from rollout.server.engine_process import EngineProcess
from rollout.server.engine_status import EngineStatus
from rollout.server.generate_call import GenerateCall
from rollout.server.generate_normalizer import GenerateNormalizer
from rollout.server.metrics import ServerMetrics
from rollout.server.request_table import RequestTable
from rollout.server.text_codec import TextCodec
from runtime.generate_input import GenerateInput, NormalizedGenerate
from runtime.messages import (AbortRequest, AbortRequestsExact, ControlResult, EmbedRequest, EngineFailed, EngineReady,
                              EngineState, FlushCacheResult, GenerateRequest, HealthCheckRequest, HealthCheckResult,
                              RequestOutput, ServerStateRequest, ServerStateResult)
from runtime.models.moe_layout import moe_layout
from runtime.response import ResponseBuilder
from runtime.sampling_params import SamplingParams

# Routes and other branches import these from here too.
__all__ = ["EngineClient", "GenerateCall", "EngineUnavailable", "EngineRequestFailed", "QueueFull",
           "ClientDisconnected", "engine_exit_reason", "EXIT_AFTER_ENGINE_DEATH_S"]

logger = logging.getLogger(__name__)

# After the engine process dies, how long this process keeps answering (503 with the reason, so clients and
# health checks learn why) before it exits non-zero for its supervisor to restart it.
EXIT_AFTER_ENGINE_DEATH_S = 1.0
HEALTH_WORK_POLL_S = 0.05  # how often a waiting health check looks whether the engine took on our work


class EngineClient:
    def __init__(self, args: Any):
        self.args = args
        self.tokenizer: PreTrainedTokenizerBase | None = None
        if not args.skip_tokenizer_init:
            self.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path or args.model_path)
        self.codec: TextCodec | None = None
        if self.tokenizer is not None:
            self.codec = TextCodec(self.tokenizer, args.tokenizer_path or args.model_path)
        self.hf_config = AutoConfig.from_pretrained(args.model_path)
        self.moe_layout = moe_layout(self.hf_config, args.is_embedding)  # None: dense (no routed experts)
        self.model_path = args.model_path                # the checkpoint last loaded from disk, as sent
        self.on_fatal = lambda: None                     # the launcher stops uvicorn
        self.engine: EngineProcess | None = None
        self.metrics: ServerMetrics | None = None        # set by the app with --enable-metrics
        self.status = EngineStatus(args.weight_version)
        self.link = EngineLink()
        self.requests = RequestTable(getattr(args, "max_queued_requests", None))
        self.controls = ControlChannel(self.link.send)
        self.normalizer = GenerateNormalizer(self.codec, self.moe_layout is not None, self.status)
        self._tasks: list[asyncio.Task] = []
        self.started_at = time.time()

    # --- the engine's state, as routes read it --------------------------------------------------

    @property
    def info(self) -> EngineReady | None:
        return self.status.info

    @property
    def ready(self) -> asyncio.Event | None:
        return self.status.ready

    @property
    def dead_reason(self) -> str | None:
        return self.status.dead_reason

    @property
    def failed(self) -> str | None:
        return self.status.failed

    @property
    def unusable(self) -> str | None:
        return self.status.unusable

    @property
    def paused(self) -> bool:
        return self.status.paused

    @property
    def weight_version(self) -> str:
        return self.status.weight_version

    @property
    def num_in_flight(self) -> int:
        return len(self.requests)

    def check_available(self) -> None:
        self.status.check_available()

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self, engine: EngineProcess) -> None:
        """Bind the sockets, watch the engine process, and wait (in the background) for it to be ready."""
        self.engine = engine
        self.status.start()
        self.link.bind(engine.addresses)
        asyncio.get_running_loop().add_reader(engine.sentinel, self._on_engine_exit)
        self._tasks.append(asyncio.create_task(self._receive_loop(), name="engine-receive"))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.engine is not None and self.engine.process is not None:
            try:
                asyncio.get_running_loop().remove_reader(self.engine.sentinel)
            except (ValueError, OSError):
                pass
        self.link.close()
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
        if not self.status.on_death(reason):
            return
        if self.info is None:
            logger.error("%s The server exits: the engine never became ready.", reason)
        else:
            logger.error("%s The server answers 503 and exits in %.0f s.", reason, EXIT_AFTER_ENGINE_DEATH_S)
        self.requests.fail_all(reason)
        self.controls.fail_all(reason)
        if self.info is None:  # it died while starting: nothing will ever be served
            self.on_fatal()

    # --- engine -> front end --------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        async for outputs in self.link.receive():
            for out in outputs:
                try:
                    self._dispatch(out)
                except Exception:  # our bug: log, keep the loop (and every other request) alive
                    logger.exception("Failed to handle %s from the engine", type(out).__name__)

    def _dispatch(self, out: Any) -> None:
        if isinstance(out, RequestOutput):
            self.requests.apply(out, self.metrics)
        elif isinstance(out, (HealthCheckResult, ServerStateResult, ControlResult)):
            if isinstance(out, ControlResult):
                self.status.on_control(out)
                if out.report is not None and out.success and self.metrics is not None:
                    self.metrics.on_weight_update(out.report)
            self.controls.resolve(out)
        elif isinstance(out, FlushCacheResult):
            self.controls.resolve_flush(out)
        elif isinstance(out, EngineState):
            self.status.on_state(out)
        elif isinstance(out, EngineReady):
            self.status.on_ready(out)
        elif isinstance(out, EngineFailed):
            self._fail(f"The engine failed: {out.message}")

    # --- generation -----------------------------------------------------------------------------

    def normalize(self, inp: GenerateInput) -> NormalizedGenerate:
        """Tokenize and check a /generate call (blocking: big inputs run it on the codec's threads)."""
        return self.normalizer.normalize(inp)

    async def normalize_async(self, inp: GenerateInput) -> NormalizedGenerate:
        """`normalize`, off the event loop for big inputs."""
        return await self.normalizer.normalize_async(inp)

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
        self.status.check_usable()
        if admit:
            self.requests.admit(len(builders))
        self.requests.check_new([b.req.rid for b in builders])
        call = GenerateCall(builders=builders, is_batch=is_batch, stream=stream, remaining=len(builders))
        timed = self.metrics is not None and log_metrics
        start = start_time if start_time is not None else time.monotonic()
        self.requests.add(call, [self.metrics.start_request(start) if timed else None for _ in builders])
        self.link.send([b.req for b in builders])
        return call

    def abandon(self, call: GenerateCall) -> None:
        """The client left: abort the call's unfinished samples in the engine (frees their KV)."""
        rids = self.requests.abandon(call)
        if rids and self.dead_reason is None:
            self.link.send([AbortRequestsExact(rids=rids)])

    def disconnect(self, call: GenerateCall) -> None:
        """The client of a call disconnected: abort it and wake whoever waits on it."""
        if call.finished:
            return
        self.abandon(call)
        call.disconnect()

    async def wait(self, call: GenerateCall) -> list[dict]:
        """Every sample's final answer, in order (non-streaming); EngineRequestFailed when a sample ended
        with a 5xx abort (the weights became unusable, the scheduler failed)."""
        return await call.results()

    def stream(self, call: GenerateCall) -> AsyncIterator[dict]:
        """The call's chunks as the engine steps (generate_call.py), incremental with
        --incremental-streaming-output."""
        return call.chunks(self.args.incremental_streaming_output)

    def abort(self, rid: str, abort_all: bool, message: str | None = None) -> None:
        self.check_available()
        if message is None:
            self.link.send([AbortRequest(rid=rid, abort_all=abort_all)])
        else:  # AbortRequest carries no message: name the rids exactly
            in_flight = self.requests.rids()
            rids = in_flight if abort_all else [r for r in in_flight if r.startswith(rid)]
            self.link.send([AbortRequestsExact(rids=rids, message=message)])

    # --- control --------------------------------------------------------------------------------

    async def flush_cache(self, timeout: float) -> FlushCacheResult:
        """Flush when the engine is idle; with a timeout, retry until it is or the time is up."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_available()
            result = await self.controls.flush_once(max(timeout, 0) + 30.0)
            if result.success or time.monotonic() >= deadline:
                return result
            await asyncio.sleep(min(0.05, max(deadline - time.monotonic(), 0)))

    async def control(self, message_cls: type, wait_s: float, /, attachments: Sequence[Any] = (),
                      **fields: Any) -> ControlResult:
        """Send a weight-update or generation-control message (with its `attachments`: see EngineLink.send);
        its ControlResult, in queue order."""
        self.check_available()
        return await self.controls.request(message_cls, wait_s, attachments, **fields)

    async def health(self, timeout: float) -> None:
        self.check_available()
        # While the engine process is alive (checked above) and applying work we sent, such as a weight
        # update, its loop answers nothing until that is done: a health check that waited for it would report
        # a busy server as a dead one. That holds for a check sent just before the work too.
        check = asyncio.ensure_future(self.controls.request(HealthCheckRequest, timeout))
        while not check.done():
            if self.controls.working():
                check.cancel()
                return
            await asyncio.wait({check}, timeout=HEALTH_WORK_POLL_S)
        result = check.result()
        if result.error is not None:
            self.status.on_health_error(result.error)
            raise EngineUnavailable(result.error)

    async def server_state(self, timeout: float) -> dict:
        self.check_available()
        result = await self.controls.request(ServerStateRequest, timeout)
        state = dict(result.state)
        state["num_frontend_reqs"] = len(self.requests)
        return state

    async def health_generate(self, timeout: float) -> None:
        """Generate one token through the whole path."""
        self.check_available()
        rid = f"HEALTH_CHECK_{self.controls.next_id()}_{time.monotonic_ns()}"
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
