"""`Engine`: the runtime in-process, with the same answers as HTTP /generate.

The scheduler runs in a background thread; generate() and friends submit typed messages to it and
wait for their outputs, so calls from several threads (or asyncio tasks) batch together.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from typing import Any, AsyncIterator, Iterator, Sequence

import torch

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from runtime.generate_input import GenerateInput, NormalizedGenerate, check_routed_experts, normalize_generate
from runtime.messages import (AbortRequest, ContinueGenerationReq, ControlResult, DestroyWeightsUpdateGroupReq,
                              FlushCacheRequest, FlushCacheResult, GetWeightsByNameReq, InitWeightsUpdateGroupReq,
                              PauseGenerationReq, ReleaseMemoryReq, RequestOutput, ResumeMemoryReq, SchedulerInput,
                              UpdateWeightsFromDiskReq, UpdateWeightsFromDistributedReq,
                              UpdateWeightsFromLocalTensorsReq, UpdateWeightVersionReq)
from runtime.messages import ExpertDistributionReq
from runtime.engine_scoring import EngineScoring
from runtime.response import ResponseBuilder
from runtime.scheduler_base import SchedulerBase
from runtime.scheduler_factory import build_scheduler
from runtime.scheduler_loop import run_scheduler_loop
from runtime.scoring_input import NEEDS_GENERATION
from runtime.server_args import ServerArgs, set_process_threads
from sync.specs import dtype_name

logger = logging.getLogger(__name__)


class WeightsUnusableError(RuntimeError):
    """The weights cannot serve (an update broke midway, or they were released without a backup) until
    the next successful update; the message says why."""


class Engine(EngineScoring):  # encode / score / rerank live in runtime/engine_scoring.py
    """The runtime in this process: `Engine(model_path, **server_args)` takes runtime/server_args.py's
    ServerArgs fields as keywords (model_path None: the default model).

    Threads: an Engine leaves torch's thread count alone, since it belongs to the process that embeds it
    (a trainer, say). Pass `num_threads=N` to have the Engine call torch.set_num_threads(N) (on CPU) for
    the whole process; the server's engine process does that from its own arguments."""

    def __init__(self, model_path: str | None = None, progress: bool = True, **server_args: Any):
        unknown = set(server_args) - ServerArgs.field_names()
        if unknown:
            raise ValueError(f"Unknown server arguments: {sorted(unknown)}.")
        if model_path is None:
            from runtime.default_model import default_model_path
            model_path = default_model_path()
        self.args = ServerArgs(model_path=model_path, **server_args)
        set_process_threads(self.args)  # only if the caller passed num_threads
        self.tokenizer: PreTrainedTokenizerBase | None = None
        if not self.args.skip_tokenizer_init:
            self.tokenizer = AutoTokenizer.from_pretrained(self.args.tokenizer_path or model_path)
        stop_tokenizer = AutoTokenizer.from_pretrained(self.args.tokenizer_path or model_path) \
            if self.tokenizer is not None else None  # the scheduler thread decodes with its own copy
        self._inbox: queue.SimpleQueue[SchedulerInput] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiters: dict[str, queue.SimpleQueue[RequestOutput]] = {}
        self._flush_waiters: queue.SimpleQueue[FlushCacheResult] = queue.SimpleQueue()
        self._control_ids = itertools.count(1)
        self._control_waiters: dict[int, queue.SimpleQueue[ControlResult]] = {}
        self._stop = threading.Event()
        built: queue.SimpleQueue[SchedulerBase | BaseException] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._build_and_run, args=(stop_tokenizer, progress, built),
                                        name="scheduler", daemon=True)
        self._thread.start()
        scheduler = built.get()
        if isinstance(scheduler, BaseException):
            raise scheduler
        self.scheduler = scheduler
        self.runner = scheduler.runner

    def _build_and_run(self, stop_tokenizer: PreTrainedTokenizerBase | None, progress: bool,
                       built: queue.SimpleQueue) -> None:
        """Load the model and run the scheduler loop, both in this thread. Why one thread: GNU OpenMP keeps
        a worker pool per thread that ever ran a parallel region, and once the pools' threads outnumber
        the cores it stops spinning between regions; every region then waits on a futex wake-up. Loading
        in the caller's thread left such a pool behind: at 2 threads on 2 cores the elementwise ops of a
        GRPO step ran 2-3x slower (measured) than with the scheduler's pool alone."""
        try:
            scheduler = build_scheduler(self.args, stop_tokenizer, progress=progress)
        except BaseException as e:  # the constructor re-raises it in the caller's thread
            built.put(e)
            return
        built.put(scheduler)
        run_scheduler_loop(scheduler, self._receive, self._dispatch, self._stop)

    # --- plumbing -------------------------------------------------------------------------------

    def _receive(self, block: bool) -> list[SchedulerInput]:
        msgs: list[SchedulerInput] = []
        try:
            msgs.append(self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait())
            while True:
                msgs.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        return msgs

    def _dispatch(self, outputs: list) -> None:
        for out in outputs:
            if isinstance(out, FlushCacheResult):
                self._flush_waiters.put(out)
                continue
            if isinstance(out, ControlResult):
                with self._lock:
                    waiter = self._control_waiters.pop(out.id, None)
                if waiter is not None:
                    waiter.put(out)
                continue
            if not isinstance(out, RequestOutput):  # EngineState: the scheduler's own fields say it here
                continue
            with self._lock:
                waiter = self._waiters.get(out.rid)
            if waiter is not None:
                waiter.put(out)

    def _submit(self, norm: NormalizedGenerate,
                merged: queue.SimpleQueue[RequestOutput] | None = None) -> list[queue.SimpleQueue[RequestOutput]]:
        """Register a queue per request (or one shared queue) and hand the requests to the scheduler."""
        queues = [merged or queue.SimpleQueue() for _ in norm.requests]
        with self._lock:
            for r in norm.requests:
                if r.rid in self._waiters:
                    raise ValueError(f"Duplicate request ID rid={r.rid!r}: a request with it is still running.")
            for r, q in zip(norm.requests, queues):
                self._waiters[r.rid] = q
        for r in norm.requests:
            self._inbox.put(r)
        return queues

    def _done(self, rid: str) -> None:
        with self._lock:
            self._waiters.pop(rid, None)

    def _normalize(self, inp: GenerateInput) -> NormalizedGenerate:
        if self.args.is_embedding:
            raise ValueError(NEEDS_GENERATION.format(route="generate"))
        tokenize = None
        if self.tokenizer is not None:
            tokenize = lambda text: self.tokenizer(text)["input_ids"]  # noqa: E731
        check_routed_experts(inp, getattr(self.runner, "moe_layout", None) is not None)
        return normalize_generate(inp, tokenize, self.runner.vocab_size, self.runner.context_len)

    # --- public API -----------------------------------------------------------------------------

    def generate(self, prompt: str | list[str] | None = None, input_ids: list[int] | list[list[int]] | None = None,
                 sampling_params: dict | list[dict] | None = None, return_logprob: bool = False,
                 logprob_start_len: int = -1, top_logprobs_num: int = 0, token_ids_logprob: list[int] | None = None,
                 stream: bool = False, rid: str | list[str] | None = None,
                 return_text_in_logprobs: bool = False, return_sampling_mask: bool = False,
                 return_routed_experts: bool = False,
                 routed_experts_start_len: int = 0) -> dict | list[dict] | Iterator[dict]:
        """With return_routed_experts (MoE models), meta_info.routed_experts holds the experts of positions
        [routed_experts_start_len, prompt + output - 1) (sync.routed_experts_codec decodes it)."""
        inp = GenerateInput(text=prompt, input_ids=input_ids, sampling_params=sampling_params, rid=rid,
                            return_logprob=return_logprob, logprob_start_len=logprob_start_len,
                            top_logprobs_num=top_logprobs_num, token_ids_logprob=token_ids_logprob,
                            return_text_in_logprobs=return_text_in_logprobs, stream=stream,
                            return_sampling_mask=return_sampling_mask,
                            return_routed_experts=return_routed_experts,
                            routed_experts_start_len=routed_experts_start_len)
        norm = self._normalize(inp)
        if self.scheduler.failed is not None:  # HTTP answers 500 / fails /health with the same message
            raise RuntimeError(self.scheduler.failed)
        unusable = self.scheduler.unusable
        if unusable is not None:  # HTTP answers 503 with the same message
            raise WeightsUnusableError(unusable)
        if stream:
            return self._stream(norm, return_text_in_logprobs)
        builders = [ResponseBuilder(r, self.tokenizer, return_text_in_logprobs) for r in norm.requests]
        self._collect(norm, builders)
        results = [b.to_dict() for b in builders]
        return results if norm.is_batch else results[0]

    def _collect(self, norm: Any, builders: list) -> None:
        """Submit the requests and feed each one's outputs to its builder (a ResponseBuilder, or a
        ScoringCollector for scoring) until it finishes."""
        queues = self._submit(norm)
        try:
            for b, q in zip(builders, queues):
                while not b.finished:
                    b.add(q.get())
        finally:
            for r in norm.requests:
                self._done(r.rid)

    def _stream(self, norm: NormalizedGenerate, return_text_in_logprobs: bool) -> Iterator[dict]:
        """Submits now (so a duplicate rid raises here), then streams from the returned iterator."""
        merged: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
        self._submit(norm, merged)
        return self._stream_chunks(norm, merged, return_text_in_logprobs)

    def _stream_chunks(self, norm: NormalizedGenerate, merged: queue.SimpleQueue[RequestOutput],
                       return_text_in_logprobs: bool) -> Iterator[dict]:
        """Cumulative chunks, one per step that produced tokens; batch items carry "index"."""
        builders = {r.rid: (i, ResponseBuilder(r, self.tokenizer, return_text_in_logprobs))
                    for i, r in enumerate(norm.requests)}
        remaining = len(builders)
        try:
            while remaining:
                out = merged.get()
                i, b = builders[out.rid]
                b.add(out)
                if b.finished:
                    remaining -= 1
                chunk = b.to_dict()
                if norm.is_batch:
                    chunk["index"] = i
                yield chunk
        finally:
            if remaining:  # the consumer stopped early: free the engine's work
                for r in norm.requests:
                    self._inbox.put(AbortRequest(rid=r.rid))
            for r in norm.requests:
                self._done(r.rid)

    async def async_generate(self, *args: Any, **kwargs: Any) -> dict | list[dict] | AsyncIterator[dict]:
        if kwargs.get("stream"):
            return self._async_stream(*args, **kwargs)
        return await asyncio.to_thread(self.generate, *args, **kwargs)

    async def _async_stream(self, *args: Any, **kwargs: Any) -> AsyncIterator[dict]:
        it = self.generate(*args, **kwargs)
        sentinel = object()
        while True:
            chunk = await asyncio.to_thread(next, it, sentinel)
            if chunk is sentinel:
                return
            yield chunk

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        self._inbox.put(AbortRequest(rid=rid, abort_all=abort_all))

    def flush_cache(self) -> FlushCacheResult:
        self._inbox.put(FlushCacheRequest())
        return self._flush_waiters.get()

    # --- weight updates and generation control (the same scheduler code as the HTTP routes) --------
    # Updates return (success, message) as SGLang's Engine does; each runs between scheduler steps.

    def _control(self, cls: type, **fields: Any) -> ControlResult:
        msg_id = next(self._control_ids)
        waiter: queue.SimpleQueue[ControlResult] = queue.SimpleQueue()
        with self._lock:
            self._control_waiters[msg_id] = waiter
        self._inbox.put(cls(id=msg_id, **fields))
        return waiter.get()

    def update_weights_from_disk(self, model_path: str, load_format: str | None = None,
                                 weight_version: str | None = None, flush_cache: bool = True,
                                 abort_all_requests: bool = False,
                                 digests: dict[str, int] | None = None) -> tuple[bool, str]:
        r = self._control(UpdateWeightsFromDiskReq, model_path=str(model_path), load_format=load_format,
                          weight_version=weight_version, flush_cache=flush_cache,
                          abort_all_requests=abort_all_requests, digests=digests)
        return r.success, r.message

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "weight_update_group", backend: str | None = None,
                                  timeout: float = 300.0) -> tuple[bool, str]:
        r = self._control(InitWeightsUpdateGroupReq, master_address=master_address, master_port=master_port,
                          rank_offset=rank_offset, world_size=world_size, group_name=group_name, backend=backend,
                          timeout=timeout)
        return r.success, r.message

    def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence[str | torch.dtype],
                                        shapes: Sequence[Sequence[int]], group_name: str = "weight_update_group",
                                        load_format: str | None = None, weight_version: str | None = None,
                                        flush_cache: bool = True,
                                        digests: dict[str, int] | None = None) -> tuple[bool, str]:
        r = self._control(UpdateWeightsFromDistributedReq, names=list(names),
                          dtypes=[d if isinstance(d, str) else dtype_name(d) for d in dtypes],
                          shapes=[list(s) for s in shapes], group_name=group_name, load_format=load_format,
                          weight_version=weight_version, flush_cache=flush_cache, digests=digests)
        return r.success, r.message

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> tuple[bool, str]:
        r = self._control(DestroyWeightsUpdateGroupReq, group_name=group_name)
        return r.success, r.message

    def update_weights_from_tensor(self, named_tensors: Sequence[tuple[str, torch.Tensor]],
                                   load_format: str | None = None, weight_version: str | None = None,
                                   flush_cache: bool = True,
                                   digests: dict[str, int] | None = None) -> tuple[bool, str]:
        """The tensors themselves go to the scheduler thread and are copied once, into the parameters."""
        if load_format not in (None, "auto", "direct"):
            return False, f"load_format={load_format!r} is not supported in-process; pass (name, tensor) pairs."
        r = self._control(UpdateWeightsFromLocalTensorsReq, named_tensors=list(named_tensors),
                          weight_version=weight_version, flush_cache=flush_cache, digests=digests)
        return r.success, r.message

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list:
        r = self._control(GetWeightsByNameReq, name=name, truncate_size=truncate_size)
        if not r.success:
            raise ValueError(r.message)
        return r.parameter

    def update_weight_version(self, new_version: str, abort_all_requests: bool = False) -> tuple[bool, str]:
        r = self._control(UpdateWeightVersionReq, new_version=new_version, abort_all_requests=abort_all_requests)
        return r.success, r.message

    def pause_generation(self, mode: str = "abort") -> tuple[bool, str]:
        r = self._control(PauseGenerationReq, mode=mode)
        return r.success, r.message

    def continue_generation(self) -> tuple[bool, str]:
        r = self._control(ContinueGenerationReq)
        return r.success, r.message

    def release_memory_occupation(self, tags: list[str] | None = None) -> tuple[bool, str]:
        r = self._control(ReleaseMemoryReq, tags=tags)
        return r.success, r.message

    def resume_memory_occupation(self, tags: list[str] | None = None) -> tuple[bool, str]:
        r = self._control(ResumeMemoryReq, tags=tags)
        return r.success, r.message

    # --- the expert distribution record (MoE models; runtime/expert_distribution.py) ----------------

    def _expert_distribution(self, action: str) -> ControlResult:
        if getattr(self.runner, "moe_layout", None) is None:
            raise ValueError("The expert distribution record needs a mixture-of-experts model; this one is dense.")
        r = self._control(ExpertDistributionReq, action=action)
        if not r.success:
            raise ValueError(r.message)
        return r

    def start_expert_distribution_record(self) -> None:
        self._expert_distribution("start")

    def stop_expert_distribution_record(self) -> None:
        self._expert_distribution("stop")

    def dump_expert_distribution_record(self) -> dict:
        """Write the record (safetensors and CSV) and start afresh: {"path", "csv_path", "summary"}."""
        return dict(self._expert_distribution("dump").report)

    @property
    def weight_version(self) -> str:
        return self.scheduler.weight_version

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
