"""Continuous batching: which requests run each step, with how many tokens, and what they produce.

Every running request extends its sequence by the tokens whose KV is missing: a whole prompt chunk
(prefill, possibly on top of a cached prefix) or its newest token (decode). Both kinds run in one
forward pass. Where their KV lives is runtime/cache_manager.py's business (paged slots, a radix cache
sharing prefixes between requests, eviction); when memory runs out even after eviction, the scheduler
retracts requests (frees their KV and re-queues them; they recompute it later and continue where they
stopped). Which prompt tokens run is runtime/admission.py's choice; the batch's layout is
runtime/batch_builder.py's.
"""

from __future__ import annotations

import logging
import random

import torch

from runtime.admission import Admission
from runtime.batch_builder import BatchEntry, build_batch
from runtime.cache_manager import CacheManager
from runtime.expert_distribution import ExpertDistributionRecorder
from runtime.finish_checker import FinishChecker
from runtime.grammar import GrammarCache, allowed_tokens, grammar_spec
from runtime.messages import (ControlResult, EmbedRequest, ExpertDistributionReq, FlushCacheResult, GenerateRequest,
                              RequestOutput)
from runtime.model_runner import ModelRunner
from runtime.output_delta import output_delta
from runtime.prompt_logprobs import record_prompt_logprobs
from runtime.request import Request, RequestStatus
from runtime.sampler import Sampler
from runtime.sampling_params import SamplingParams
from runtime.scheduler_base import SchedulerBase, abort_reason
from runtime.stop_checker import StopChecker

logger = logging.getLogger(__name__)

NON_FINITE_LOGITS = ("The model's logits for the next token are not finite (NaN or Inf): the weights overflow on "
                     "this input, so no token was sampled. Check the last weight update.")


class Scheduler(SchedulerBase):
    def __init__(self, runner: ModelRunner, eos_token_ids: set[int], stop_checker: StopChecker | None = None,
                 grammar_cache: GrammarCache | None = None):
        super().__init__(runner)
        args = runner.args
        self.page_size = args.page_size
        self.context_len = runner.context_len
        self.vocab_size = runner.vocab_size
        self.eos_token_ids = eos_token_ids
        self.finish_checker = FinishChecker(eos_token_ids, stop_checker, self.context_len)
        self.cache_manager = CacheManager(runner.kv_pool, self.page_size, args.max_running_requests,
                                          self.context_len, prefix_caching=not args.disable_radix_cache)
        self.admission = Admission(self.cache_manager, args)
        self.sampler = Sampler(self.vocab_size, eos_token_ids)
        self.rng = random.Random(args.random_seed)
        self.num_retractions = 0
        self.grammar_cache = grammar_cache  # None without a tokenizer: constrained requests are refused
        # MoE models: routing is kept per KV slot (runner.routed_experts); the record counts it.
        self.expert_recorder: ExpertDistributionRecorder | None = None
        if getattr(runner, "moe_layout", None) is not None:
            self.expert_recorder = ExpertDistributionRecorder(
                runner.moe_layout, args.expert_distribution_recorder_mode,
                args.expert_distribution_recorder_buffer_size, args.expert_distribution_dir, runner.device)
        self._handlers[ExpertDistributionReq] = lambda m: [self._expert_distribution(m)]

    # --- messages -------------------------------------------------------------------------------

    def add_request(self, msg: GenerateRequest) -> None:
        if msg.rid in self.requests:
            raise ValueError(f"Duplicate request ID rid={msg.rid!r}: a request with it is still running.")
        seed = msg.sampling_params.sampling_seed
        if seed is None:
            seed = self.rng.getrandbits(63)
        req = Request.from_message(msg, seed)
        spec = grammar_spec(msg.sampling_params)
        if spec is not None:
            if self.grammar_cache is None:
                raise ValueError(f"sampling_params.{spec[0]} needs the tokenizer; the server runs without one.")
            req.grammar = self.grammar_cache.matcher(*spec)
        self.requests[req.rid] = req
        self.waiting.append(req)

    def add_embed_request(self, msg: EmbedRequest) -> None:
        """Scoring is a prefill with no new token (chunked and prefix-cached like any prompt); the
        model's compute_logits row of the last token (its head) is the answer."""
        self.add_request(GenerateRequest(rid=msg.rid, input_ids=msg.input_ids,
                                         sampling_params=SamplingParams(max_new_tokens=0)))
        self.requests[msg.rid].embed = True

    def flush_cache(self) -> FlushCacheResult:
        if self.requests:
            return FlushCacheResult(success=False, message="Cache not flushed: there are running or waiting requests.")
        self.cache_manager.reset()
        return FlushCacheResult(success=True, message="Cache flushed.")

    def has_work(self) -> bool:
        if self.paused is not None or self.memory_released:
            return False
        return bool(self.waiting or self.running)

    # --- one step -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one forward pass over a batch; return what requests produced (streamed or finished)."""
        stopped = self.controller.poll()  # weights left a mix by a dead trainer: nothing may run on them
        if stopped or self.unusable is not None:
            return stopped
        decodes = self._alloc_decode_slots([r for r in self.running if r.num_uncomputed == 1])
        if len(decodes) > 1:  # requests sharing a cached prefix side by side: attention reads it once
            first_slots = self.cache_manager.first_slots(decodes)
            decodes = [r for _, r in sorted(zip(first_slots, decodes), key=lambda x: x[0])]
        extends = self.admission.schedule_extends([r for r in self.running if r.num_uncomputed > 1],
                                                  self.waiting, self.running)
        if not extends and not decodes:
            return []
        # One-token extends join the decode group, which must come last in the batch.
        extends.sort(key=lambda s: s.extend_len == 1)
        scheduled = extends + [BatchEntry(r, 1, r.kv_len) for r in decodes]
        batch, sample_rows, lp_rows = build_batch(scheduled, self.cache_manager, self.runner.device)
        logits = self.runner.forward(batch)
        self.forward_steps += 1
        if self.expert_recorder is not None:
            self.expert_recorder.record(batch.routing)
        outputs: list[RequestOutput] = []
        for s in scheduled:
            s.req.kv_len = s.kv_start + s.extend_len
        record_prompt_logprobs(scheduled, logits, lp_rows)
        self._sample(scheduled, logits, sample_rows)
        for s in scheduled:
            req = s.req
            if req.finished:
                self._finish(req)
                outputs.append(self._output(req))
            else:
                if s.extend_len > 1:  # siblings waiting on this prompt read its KV from the cache
                    self.cache_manager.share_prefix(req)
                if req.stream and len(req.output_ids) > req.sent_tokens:
                    outputs.append(self._output(req))
        return outputs

    # --- memory ---------------------------------------------------------------------------------

    def _alloc_decode_slots(self, decodes: list[Request]) -> list[Request]:
        """One KV slot per decoding request; retract requests until they fit."""
        while decodes and not self.cache_manager.ensure_decode_room(decodes):
            victim = self._retraction_victim()
            self.retract(victim)
            if victim in decodes:
                decodes.remove(victim)
        if decodes:
            self.cache_manager.alloc_decode(decodes)
        return decodes

    def _retraction_victim(self) -> Request:
        # The request that has produced least loses least by recomputing; among equals the newest.
        return min(self.running, key=lambda r: (len(r.output_ids), -r.arrival))

    def retract(self, req: Request) -> None:
        """Free a running request's KV and queue it first again; it recomputes the KV and goes on."""
        self.cache_manager.release(req)
        if req.input_logprobs_pending:  # prompt logprobs are recomputed from the start
            req.input_token_logprobs.clear()
            req.input_top_logprobs.clear()
            req.input_token_ids_logprobs.clear()
        req.status = RequestStatus.WAITING
        self.running.remove(req)
        self.waiting.appendleft(req)
        self.num_retractions += 1
        logger.debug("Retracted %s with %d output tokens", req.rid, len(req.output_ids))

    def retract_all(self) -> None:
        for req in reversed(list(self.running)):  # appendleft in reverse keeps their order
            self.retract(req)

    def invalidate_kv(self) -> None:
        """New weights: running requests keep their KV, marked stale, with a private copy of any cached
        prefix they read (retracted when there is no memory for it); then the cache is dropped."""
        for req in list(self.running):
            if not self.cache_manager.detach_from_cache(req):
                self.retract(req)  # recomputes under the new weights
        self.cache_manager.drop_cache()

    def release_kv_memory(self) -> bool:
        self.cache_manager.release_memory()
        return True

    def resume_kv_memory(self) -> None:
        self.cache_manager.resume_memory()

    # --- results --------------------------------------------------------------------------------

    def _sample(self, scheduled: list[BatchEntry], logits: torch.Tensor, sample_rows: dict[int, int]) -> None:
        todo = [(i, r) for i, r in sample_rows.items()
                if len(scheduled[i].req.output_ids) < scheduled[i].req.sampling_params.max_new_tokens]
        for i in sample_rows:
            req = scheduled[i].req
            if req.sampling_params.max_new_tokens == 0:
                req.finish_reason = {"type": "length", "length": 0}
                if req.embed:
                    req.embedding = logits[sample_rows[i]].tolist()
        if not todo:
            return
        reqs = [scheduled[i].req for i, _ in todo]
        row_ids = [r for _, r in todo]
        # Usually every logits row samples, in order: skip the [R, vocab] gather then.
        rows = logits if row_ids == list(range(logits.shape[0])) else logits[torch.tensor(row_ids, device=logits.device)]
        # NaN and +-Inf show in a row's max or min (both propagate NaN): two vectorized passes, about a
        # tenth of isfinite(rows).all(-1), which was 3 % of a GRPO decode step.
        finite = torch.isfinite(rows.amax(dim=-1)) & torch.isfinite(rows.amin(dim=-1))
        if not bool(finite.all()):
            reqs, rows = self._drop_non_finite(reqs, rows, finite)
            if not reqs:
                return
        want_support = [r.return_sampling_mask for r in reqs]
        out = self.sampler.sample(rows, reqs, [r.return_logprob for r in reqs], [r.top_logprobs_num for r in reqs],
                                  [r.token_ids_logprob for r in reqs],
                                  allowed=allowed_tokens([r.grammar for r in reqs], self.vocab_size),
                                  want_support=want_support if any(want_support) else None)
        for j, req in enumerate(reqs):
            token = out.next_token_ids[j]
            req.output_ids.append(token)
            req.output_weight_versions.append(self.weight_version)
            if req.return_logprob:
                req.output_token_logprobs.append(out.logprobs[j])
                if req.top_logprobs_num:
                    req.output_top_logprobs.append(out.top_logprobs[j])
                if req.token_ids_logprob is not None:
                    req.output_token_ids_logprobs.append(out.token_ids_logprobs[j])
            if req.return_sampling_mask:
                req.output_sampling_masks.append(out.sampling_masks[j])
            req.finish_reason = self.finish_checker.check(req, token)

    @staticmethod
    def _drop_non_finite(reqs: list[Request], rows: torch.Tensor,
                         finite: torch.Tensor) -> tuple[list[Request], torch.Tensor]:
        """Rows whose logits hold NaN or Inf sample nothing: a token drawn from them would be garbage with
        a NaN logprob, which a trainer would take for real. Their requests end with an abort naming why."""
        keep = finite.tolist()
        for req, ok in zip(reqs, keep):
            if not ok:
                logger.error("Request %s: non-finite logits at output position %d", req.rid, len(req.output_ids))
                req.finish_reason = abort_reason(NON_FINITE_LOGITS, 500)
        return [r for r, ok in zip(reqs, keep) if ok], rows[finite]

    def _finish(self, req: Request) -> None:
        if req.return_routed_experts:
            req.routed_experts = self._routed_experts(req)
        self.cache_manager.release(req)
        if req in self.running:
            self.running.remove(req)
        elif req.status == RequestStatus.WAITING and req in self.waiting:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED
        self.requests.pop(req.rid, None)

    def _output(self, req: Request) -> RequestOutput:
        return output_delta(req, self.weight_version)

    # --- MoE routing ----------------------------------------------------------------------------

    def _routed_experts(self, req: Request) -> torch.Tensor:
        """[n, MoE layers, top_k] experts of positions [routed_experts_start_len, seq_len - 1) that have KV
        (all of them, unless aborted early), read from the request's slots whoever computed them."""
        pool = getattr(self.runner, "routed_experts", None)
        end = min(req.kv_len, len(req.input_ids) + len(req.output_ids) - 1) if req.req_pool_row is not None else 0
        start = min(req.routed_experts_start_len, end)
        if pool is None or end <= start:
            layers, k = (pool.layout.num_layers, pool.layout.top_k) if pool is not None else (0, 0)
            return torch.zeros(0, layers, k, dtype=torch.int16)
        return pool.read(self.cache_manager.slots(req, start, end))

    def _expert_distribution(self, msg: ExpertDistributionReq) -> ControlResult:
        report = None
        if self.expert_recorder is None:
            success, message = False, "The expert distribution record needs a MoE model; this one is dense."
        else:
            try:
                message, report = self.expert_recorder.handle(msg.action)
                success = True
            except (ValueError, OSError) as e:  # an unknown action, an unwritable directory
                success, message = False, str(e)
        return ControlResult(id=msg.id, success=success, message=message, weight_version=self.weight_version,
                             unusable=self.unusable, paused=self.paused is not None, report=report)

    # --- state ----------------------------------------------------------------------------------

    @property
    def max_total_num_tokens(self) -> int:
        return self.cache_manager.num_tokens

    def is_idle_clean(self) -> bool:
        """No request holds KV and every slot is either free or in the cache (nothing leaked)."""
        return not self.requests and self.cache_manager.is_idle_clean()

    def state(self) -> dict:
        idle_clean, integrity_error = False, None
        if not self.requests:  # the full check walks the cache: only worth it (and only true) when idle
            try:
                idle_clean = self.is_idle_clean()
            except AssertionError as e:  # the radix cache's own check failed: report it, do not crash
                integrity_error = str(e) or "radix cache integrity check failed"
        return {**self.base_state(), **self.cache_manager.stats(), "idle_clean": idle_clean,
                "integrity_error": integrity_error, "num_retractions": self.num_retractions}
