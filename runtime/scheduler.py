"""Continuous batching: which requests run each step, with how many tokens, and what they produce.

Every running request extends its sequence by the tokens whose KV is missing: a whole prompt chunk
(prefill, possibly on top of a cached prefix) or its newest token (decode). Both kinds run in one
forward pass. Where their KV lives is runtime/cache_manager.py's business (paged slots, a radix cache
sharing prefixes between requests, eviction); when memory runs out even after eviction, the scheduler
retracts requests (frees their KV and re-queues them; they recompute it later and continue where they
stopped).
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass

import torch

from runtime.cache_manager import CacheManager
from runtime.forward_batch import ForwardBatch
from runtime.expert_distribution import ExpertDistributionRecorder
from runtime.grammar import GrammarCache, allowed_tokens, grammar_spec
from runtime.messages import (ControlResult, EmbedRequest, ExpertDistributionReq, FlushCacheResult, GenerateRequest,
                              RequestOutput)
from runtime.model_runner import ModelRunner
from runtime.request import Request, RequestStatus
from runtime.sampler import Sampler, logprob_entries, processed_logprobs
from runtime.sampling_params import SamplingParams
from runtime.scheduler_base import SchedulerBase
from runtime.stop_checker import StopChecker

logger = logging.getLogger(__name__)

# Longest-prefix-first ordering costs a tree match per waiting request; past this many, serve FCFS.
LPM_MAX_WAITING = 128
# A waiting request sharing at least this many uncached tokens with one admitted in the same step
# waits a step, so the shared prefix is computed once and then read from the cache (n > 1 groups).
IN_BATCH_SHARED_PREFIX = 32
# Admission keeps this fraction of running requests' remaining new tokens free for their decodes.
DECODE_RESERVE_RATIO = 0.3
DECODE_RESERVE_CLIP = 256


@dataclass
class _Scheduled:
    req: Request
    extend_len: int
    kv_start: int


class Scheduler(SchedulerBase):
    def __init__(self, runner: ModelRunner, eos_token_ids: set[int], stop_checker: StopChecker | None = None,
                 grammar_cache: GrammarCache | None = None):
        super().__init__(runner)
        args = runner.args
        self.page_size = args.page_size
        self.context_len = runner.context_len
        self.vocab_size = runner.vocab_size
        self.eos_token_ids = eos_token_ids
        self.stop_checker = stop_checker
        self.cache_manager = CacheManager(runner.kv_pool, self.page_size, args.max_running_requests,
                                          self.context_len, prefix_caching=not args.disable_radix_cache)
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
        extends = self._schedule_extends([r for r in self.running if r.num_uncomputed > 1])
        if not extends and not decodes:
            return []
        # One-token extends join the decode group, which must come last in the batch.
        extends.sort(key=lambda s: s.extend_len == 1)
        scheduled = extends + [_Scheduled(r, 1, r.kv_len) for r in decodes]
        batch, sample_rows, lp_rows = self._build_batch(scheduled)
        logits = self.runner.forward(batch)
        self.forward_steps += 1
        if self.expert_recorder is not None:
            self.expert_recorder.record(batch.routing)
        outputs: list[RequestOutput] = []
        for s in scheduled:
            s.req.kv_len = s.kv_start + s.extend_len
        self._input_logprobs(scheduled, logits, lp_rows)
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

    # --- admission ------------------------------------------------------------------------------

    def _decode_reserve(self) -> int:
        remaining = sum(min(r.sampling_params.max_new_tokens - len(r.output_ids), DECODE_RESERVE_CLIP)
                        for r in self.running)
        return int(remaining * DECODE_RESERVE_RATIO)

    def _schedule_extends(self, prefilling: list[Request]) -> list[_Scheduled]:
        budget = self.args.prefill_step_tokens
        scheduled: list[_Scheduled] = []
        for req in prefilling:  # chunked prefills already under way go first
            if budget <= 0:
                break
            n = min(req.num_uncomputed, budget)
            if not self.cache_manager.extend(req, n):
                break
            scheduled.append(_Scheduled(req, n, req.kv_len))
            budget -= n
        if budget > 0 and self.waiting:
            scheduled += self._admit(budget, [s.req.fill_ids for s in scheduled])
        return scheduled

    def _admission_order(self) -> list[Request]:
        if len(self.waiting) > LPM_MAX_WAITING:
            return list(self.waiting)
        # With prefix caching off every match is empty: first come, first served.
        matched = {id(r): self.cache_manager.match(r).slots.shape[0] for r in self.waiting}
        return sorted(self.waiting, key=lambda r: -matched[id(r)])  # stable: FCFS among equals

    def _admit(self, budget: int, prefilling_fills: list[list[int]]) -> list[_Scheduled]:
        scheduled: list[_Scheduled] = []
        admitted_fills: list[list[int]] = list(prefilling_fills)
        reserve = self._decode_reserve()
        for req in self._admission_order():
            if budget <= 0 or len(self.running) >= self.args.max_running_requests:
                break
            fill = req.fill_ids
            match = self.cache_manager.match(req)
            prefix = self._usable_prefix(req, match.slots.shape[0])
            if any(self._should_wait_for(req, fill, prefix, other) for other in admitted_fills):
                continue
            n = len(fill) - prefix
            if not self.args.chunked_prefill and n > budget:
                if scheduled or admitted_fills:  # no chunking: a prompt over the step's budget runs alone
                    break
                budget = n
            n = min(n, budget)
            if not self.cache_manager.admit(req, match, prefix, n, reserve):
                break
            if not req.admitted_once:
                req.cached_tokens = prefix
                req.admitted_once = True
            req.status = RequestStatus.RUNNING
            self.waiting.remove(req)
            self.running.append(req)
            scheduled.append(_Scheduled(req, n, prefix))
            admitted_fills.append(fill)
            budget -= n
        return scheduled

    def _should_wait_for(self, req: Request, fill: list[int], prefix: int, other: list[int]) -> bool:
        """Whether `req` should wait a step for `other` (being prefilled now) to put their common prefix
        in the cache: a long shared prefix, or any usable one of an identical prompt (n > 1 siblings)."""
        shared = self._usable_prefix(req, _common_prefix_len(fill, other)) - prefix
        return shared >= IN_BATCH_SHARED_PREFIX or (shared > 0 and other == fill)

    def _usable_prefix(self, req: Request, matched: int) -> int:
        # At least one token must run to produce logits; prompt logprobs need their positions computed.
        limit = len(req.fill_ids) - 1
        if req.input_logprobs_pending:
            limit = min(limit, req.logprob_start_len)
        limit -= limit % self.page_size
        return min(matched, limit)

    # --- the batch ------------------------------------------------------------------------------

    def _build_batch(self, scheduled: list[_Scheduled]) -> tuple[ForwardBatch, dict[int, int], dict[int, tuple[int, int]]]:
        """The ForwardBatch, plus which logits row samples each request and which rows hold its
        prompt-logprob positions (first row, first position)."""
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        out_slots: list[torch.Tensor] = []
        logits_indices: list[int] = []
        sample_rows: dict[int, int] = {}
        lp_rows: dict[int, tuple[int, int]] = {}
        num_extend = max((i + 1 for i, s in enumerate(scheduled) if s.extend_len > 1), default=0)
        t = 0
        for i, s in enumerate(scheduled):
            req, n, start = s.req, s.extend_len, s.kv_start
            prompt_len = len(req.input_ids)
            if n == 1:  # decode: avoid building the whole fill list
                ids.append(req.input_ids[start] if start < prompt_len else req.output_ids[start - prompt_len])
            else:
                ids.extend(req.fill_ids[start:start + n])
            end = start + n
            fill_len = prompt_len + len(req.output_ids)
            if req.input_logprobs_pending:
                lo = max(req.logprob_start_len, start)
                hi = min(end, prompt_len)
                if lo < hi:
                    lp_rows[i] = (len(logits_indices), lo)
                    logits_indices.extend(range(t + lo - start, t + hi - start))
            if end == fill_len:
                last_row = t + n - 1
                if logits_indices and logits_indices[-1] == last_row:
                    sample_rows[i] = len(logits_indices) - 1
                else:
                    sample_rows[i] = len(logits_indices)
                    logits_indices.append(last_row)
            t += n
        host = torch.device("cpu")  # built on the host, moved to the device once below
        rows = torch.tensor([s.req.req_pool_row for s in scheduled], device=host)
        prefix_lens = torch.tensor([s.kv_start for s in scheduled], device=host)
        extend_lens = torch.tensor([s.extend_len for s in scheduled], device=host)
        seq_lens = prefix_lens + extend_lens
        for s in scheduled[:num_extend]:
            positions.append(torch.arange(s.kv_start, s.kv_start + s.extend_len, device=host))
            out_slots.append(self.cache_manager.slots(s.req, s.kv_start, s.kv_start + s.extend_len))
        if num_extend < len(scheduled):
            dec_rows, dec_pos = rows[num_extend:], prefix_lens[num_extend:]
            positions.append(dec_pos)
            out_slots.append(self.cache_manager.slots_at(dec_rows, dec_pos))
        device = self.runner.device
        batch = ForwardBatch(
            input_ids=torch.tensor(ids, device=device),
            positions=torch.cat(positions).to(device),
            out_slots=torch.cat(out_slots).to(device),
            prefix_lens=prefix_lens.to(device),
            extend_lens=extend_lens.to(device),
            seq_lens=seq_lens.to(device),
            page_table=self.cache_manager.page_table(rows.to(device), int(seq_lens.max())),
            num_extend=num_extend,
            logits_indices=torch.tensor(logits_indices, dtype=torch.int64, device=device),
        )
        return batch, sample_rows, lp_rows

    # --- results --------------------------------------------------------------------------------

    def _input_logprobs(self, scheduled: list[_Scheduled], logits: torch.Tensor,
                        lp_rows: dict[int, tuple[int, int]]) -> None:
        for i, (row0, pos0) in lp_rows.items():
            req = scheduled[i].req
            prompt_len = len(req.input_ids)
            end = min(req.kv_len, prompt_len)
            if pos0 == req.logprob_start_len:  # the first reported position has no context: null
                req.input_token_logprobs.append(None)
                req.input_top_logprobs.append(None)
                req.input_token_ids_logprobs.append(None)
            # Row for position p predicts token p + 1; the last prompt position predicts no prompt token.
            last_pos = min(end, prompt_len - 1)
            if last_pos > pos0:
                rows = logits[row0:row0 + last_pos - pos0]
                targets = torch.tensor(req.input_ids[pos0 + 1:last_pos + 1], device=logits.device)
                lp = processed_logprobs(rows, req.sampling_params.temperature)
                chosen, top, by_id = logprob_entries(lp, targets, req.top_logprobs_num, req.token_ids_logprob)
                req.input_token_logprobs.extend(chosen)
                if top is not None:
                    req.input_top_logprobs.extend(top)
                if by_id is not None:
                    req.input_token_ids_logprobs.extend(by_id)
            if end >= prompt_len:
                req.input_logprobs_pending = False

    def _sample(self, scheduled: list[_Scheduled], logits: torch.Tensor, sample_rows: dict[int, int]) -> None:
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
            req.finish_reason = self._check_finish(req, token)
            if req.grammar is not None and req.finish_reason is None:
                req.finish_reason = _grammar_finish(req, token)

    def _check_finish(self, req: Request, token: int) -> dict | None:
        sp = req.sampling_params
        if token in sp.stop_token_ids or (not sp.ignore_eos and token in self.eos_token_ids):
            if len(req.output_ids) >= sp.min_new_tokens:
                return {"type": "stop", "matched": token}
        if sp.stop and self.stop_checker is not None and len(req.output_ids) >= sp.min_new_tokens:
            matched = self.stop_checker.find(req.output_ids, sp.stop)
            if matched is not None:
                return {"type": "stop", "matched": matched}
        if len(req.output_ids) >= sp.max_new_tokens:
            return {"type": "length", "length": sp.max_new_tokens}
        if len(req.input_ids) + len(req.output_ids) >= self.context_len:
            return {"type": "length", "length": len(req.output_ids)}
        return None

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
        new = req.output_ids[req.sent_tokens:]
        k = req.sent_tokens
        out = RequestOutput(
            rid=req.rid, new_token_ids=new, prompt_tokens=len(req.input_ids), cached_tokens=req.cached_tokens,
            # The version that produced the request's last token (an old one for a request aborted
            # before its first step under new weights).
            weight_version=req.output_weight_versions[-1] if req.output_weight_versions else self.weight_version,
            finished=req.finished, finish_reason=req.finish_reason,
            output_token_weight_versions=req.output_weight_versions[k:], embedding=req.embedding)
        if req.return_sampling_mask:
            out.output_sampling_masks = req.output_sampling_masks[k:]
        if req.return_logprob:
            out.output_token_logprobs = req.output_token_logprobs[k:]
            out.output_top_logprobs = req.output_top_logprobs[k:]
            out.output_token_ids_logprobs = req.output_token_ids_logprobs[k:]
            if not req.sent_input_logprobs and (not req.input_logprobs_pending or req.finished):
                out.input_token_logprobs = req.input_token_logprobs
                out.input_top_logprobs = req.input_top_logprobs if req.top_logprobs_num else None
                out.input_token_ids_logprobs = req.input_token_ids_logprobs if req.token_ids_logprob is not None else None
                req.sent_input_logprobs = True
        if req.finished and req.routed_experts is not None:
            out.routed_experts = req.routed_experts.cpu().numpy().astype("<i2").tobytes()
            out.routed_experts_shape = list(req.routed_experts.shape)
        req.sent_tokens = len(req.output_ids)
        return out

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


def _grammar_finish(req: Request, token: int) -> dict | None:
    """Advance the request's grammar by its new token: a complete grammar ends the request (stop, as
    EOS would; with ignore_eos the grammar still ends it, since it can take nothing more)."""
    if not req.grammar.accept(token):  # the allowed set was applied, so this is our bug: end loudly
        return {"type": "abort", "message": f"Internal error: the grammar rejected the sampled token {token}."}
    if req.grammar.terminated:
        return {"type": "stop", "matched": token}
    return None


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    return len(os.path.commonprefix([a, b]))
