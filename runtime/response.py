"""Accumulates a request's outputs from the scheduler into the response dict of API.md."""

from __future__ import annotations

import base64
import time
from typing import Any

from transformers import PreTrainedTokenizerBase

from runtime.messages import GenerateRequest, LogprobEntry, RequestOutput


class ResponseBuilder:
    def __init__(self, req: GenerateRequest, tokenizer: PreTrainedTokenizerBase | None,
                 return_text_in_logprobs: bool = False, start_time: float | None = None):
        self.req = req
        self.tokenizer = tokenizer
        self.return_text_in_logprobs = return_text_in_logprobs and tokenizer is not None
        self.start_time = start_time if start_time is not None else time.monotonic()
        self.output_ids: list[int] = []
        self.finished = False
        self.finish_reason: dict | None = None
        self.prompt_tokens = len(req.input_ids)
        self.cached_tokens = 0
        self.weight_version = ""
        self.output_token_logprobs: list[float] = []
        self.output_top_logprobs: list[list[LogprobEntry]] = []
        self.output_token_ids_logprobs: list[list[LogprobEntry]] = []
        self.output_token_weight_versions: list[str] = []
        self.output_sampling_masks: list[list[int] | None] = []
        self.input_token_logprobs: list[float | None] | None = None
        self.input_top_logprobs: list | None = None
        self.input_token_ids_logprobs: list | None = None
        self.routed_experts: bytes | None = None
        self.routed_experts_shape: list[int] | None = None

    def add(self, out: RequestOutput) -> None:
        self.output_ids.extend(out.new_token_ids)
        self.prompt_tokens = out.prompt_tokens
        self.cached_tokens = out.cached_tokens
        self.weight_version = out.weight_version
        self.output_token_logprobs.extend(out.output_token_logprobs)
        self.output_top_logprobs.extend(out.output_top_logprobs)
        self.output_token_ids_logprobs.extend(out.output_token_ids_logprobs)
        self.output_token_weight_versions.extend(out.output_token_weight_versions)
        self.output_sampling_masks.extend(out.output_sampling_masks)
        if out.input_token_logprobs is not None:
            self.input_token_logprobs = out.input_token_logprobs
            self.input_top_logprobs = out.input_top_logprobs
            self.input_token_ids_logprobs = out.input_token_ids_logprobs
        if out.routed_experts is not None:
            self.routed_experts, self.routed_experts_shape = out.routed_experts, out.routed_experts_shape
        if out.finished:
            self.finished = True
            self.finish_reason = out.finish_reason

    # --- rendering ------------------------------------------------------------------------------

    def text(self) -> str:
        sp = self.req.sampling_params
        ids = self.output_ids
        fr = self.finish_reason or {}
        matched = fr.get("matched")
        if fr.get("type") == "stop" and isinstance(matched, int) and not sp.no_stop_trim and ids:
            ids = ids[:-1]  # the stop token is not part of the answer's text
        text = self.tokenizer.decode(ids, skip_special_tokens=sp.skip_special_tokens)
        if fr.get("type") == "stop" and isinstance(matched, str) and not sp.no_stop_trim:
            pos = text.find(matched)
            if pos >= 0:
                text = text[:pos]
        return text

    def _token_text(self, token_id: int) -> str | None:
        if not self.return_text_in_logprobs:
            return None
        return self.tokenizer.decode([token_id])

    def _triples(self, logprobs: list[float | None], token_ids: list[int]) -> list[list[Any]]:
        return [[lp, t, self._token_text(t)] for lp, t in zip(logprobs, token_ids)]

    def _entry_lists(self, rows: list) -> list:
        return [None if row is None else [[lp, t, self._token_text(t)] for lp, t in row] for row in rows]

    def to_dict(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "id": self.req.rid,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(self.output_ids),
            "cached_tokens": self.cached_tokens,
            "weight_version": self.weight_version,
            "e2e_latency": time.monotonic() - self.start_time,
        }
        if self.req.return_logprob:
            start = self.req.logprob_start_len
            input_ids = self.req.input_ids[start:] if start >= 0 else []
            meta["input_token_logprobs"] = self._triples(self.input_token_logprobs or [], input_ids)
            meta["output_token_logprobs"] = self._triples(self.output_token_logprobs, self.output_ids)
            if self.req.top_logprobs_num > 0:
                meta["input_top_logprobs"] = self._entry_lists(self.input_top_logprobs or [])
                meta["output_top_logprobs"] = self._entry_lists(self.output_top_logprobs)
            if self.req.token_ids_logprob is not None:
                meta["input_token_ids_logprobs"] = self._entry_lists(self.input_token_ids_logprobs or [])
                meta["output_token_ids_logprobs"] = self._entry_lists(self.output_token_ids_logprobs)
            meta["output_token_weight_versions"] = list(self.output_token_weight_versions)
        if self.req.return_sampling_mask:  # SGLang's key; null for a token whose distribution was not cut
            meta["output_token_sampling_mask"] = list(self.output_sampling_masks)
        if self.req.return_routed_experts and self.routed_experts is not None:
            # sync/routed_experts_codec.py decodes it: base64 of little-endian int16 [tokens, MoE layers, top_k].
            meta["routed_experts"] = base64.b64encode(self.routed_experts).decode("ascii")
            meta["routed_experts_shape"] = list(self.routed_experts_shape)
            meta["routed_experts_start_len"] = self.req.routed_experts_start_len
        result: dict[str, Any] = {}
        if self.tokenizer is not None:
            result["text"] = self.text()
        result["output_ids"] = list(self.output_ids)
        result["meta_info"] = meta
        return result
