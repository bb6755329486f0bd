"""Collects a scoring request's output from the scheduler and renders the answers of API.md's Scoring
section: /encode items, /v1/score probabilities, /v1/rerank scores."""

from __future__ import annotations

import math
import time
from typing import Any

from runtime.messages import EmbedRequest, GenerateRequest, RequestOutput


class ScoringAborted(Exception):
    """A scoring request ended without a result (aborted, or refused by the engine)."""


class ScoringCollector:
    """Duck-types runtime/response.py's ResponseBuilder (req, add, finished, to_dict) so the Engine and
    the HTTP front end track scoring requests exactly like generation ones."""

    def __init__(self, req: EmbedRequest | GenerateRequest, start_time: float | None = None,
                 prompt_tokens: int | None = None):
        """`prompt_tokens`: the client's token count when the request runs fewer (trailing pads dropped)."""
        self.req = req
        self.start_time = start_time if start_time is not None else time.monotonic()
        self.finished = False
        self.finish_reason: dict | None = None
        self.client_prompt_tokens = prompt_tokens
        self.prompt_tokens = len(req.input_ids) if prompt_tokens is None else prompt_tokens
        self.cached_tokens = 0
        self.weight_version = ""
        self.embedding: list[float] | None = None
        self.token_ids_logprobs: list[tuple[float, int]] | None = None

    def add(self, out: RequestOutput) -> None:
        if self.client_prompt_tokens is None:
            self.prompt_tokens = out.prompt_tokens
        self.cached_tokens = out.cached_tokens
        self.weight_version = out.weight_version
        if out.embedding is not None:
            self.embedding = out.embedding
        if out.output_token_ids_logprobs:
            self.token_ids_logprobs = list(out.output_token_ids_logprobs[0])
        if out.finished:
            self.finished = True
            self.finish_reason = out.finish_reason

    def check(self) -> None:
        fr = self.finish_reason or {}
        if fr.get("type") == "abort":
            raise ScoringAborted(f"Request {self.req.rid} was aborted: {fr.get('message', '')}")

    def to_dict(self) -> dict[str, Any]:
        """The /encode (and /classify) item."""
        self.check()
        return {"embedding": self.embedding, "meta_info": {
            "id": self.req.rid, "finish_reason": self.finish_reason, "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens, "weight_version": self.weight_version,
            "e2e_latency": time.monotonic() - self.start_time}}

    def label_scores(self, label_token_ids: list[int], apply_softmax: bool) -> list[float]:
        """P(label) under the full-vocabulary distribution, or softmaxed over the labels only."""
        self.check()
        by_id = {t: lp for lp, t in self.token_ids_logprobs or []}
        logprobs = [by_id[t] for t in label_token_ids]
        if not apply_softmax:
            return [math.exp(lp) for lp in logprobs]
        m = max(logprobs)
        exps = [math.exp(lp - m) for lp in logprobs]
        total = sum(exps)
        return [e / total for e in exps]
