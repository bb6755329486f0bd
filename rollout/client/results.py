"""Typed results of the rollout client (msgspec structs: cheap to build, easy to serialize)."""

from __future__ import annotations

from typing import Any

import msgspec


class FinishReason(msgspec.Struct, frozen=True):
    type: str                       # "stop" | "length" | "abort"
    matched: int | str | None = None  # stop: the token id or stop string that matched
    length: int | None = None       # length: max_new_tokens
    message: str | None = None      # abort: why

    @classmethod
    def from_json(cls, fr: dict[str, Any] | None) -> "FinishReason":
        if not fr:
            return cls(type="unknown")
        return cls(type=fr.get("type", "unknown"), matched=fr.get("matched"), length=fr.get("length"),
                   message=fr.get("message"))


class GenerateResult(msgspec.Struct):
    """One sample: sample `sample_index` of prompt `prompt_index` of the batch."""
    prompt_index: int
    sample_index: int
    output_ids: list[int]
    text: str | None                  # None when the server runs with --skip-tokenizer-init
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int                # prompt tokens served from the prefix cache
    weight_version: str               # the version that produced the last token
    output_logprobs: list[float] | None          # with return_logprob: one per output token
    output_weight_versions: list[str] | None     # with return_logprob: the version that produced each token
    input_logprobs: list[float | None] | None    # with logprob_start_len >= 0 (first is None)
    rid: str
    server: str                       # the server's URL (all n samples of a prompt share it)
    meta_info: dict[str, Any]         # everything the server sent (top logprobs, latency, ...)

    @classmethod
    def from_json(cls, d: dict[str, Any], prompt_index: int, sample_index: int, server: str) -> "GenerateResult":
        meta = d.get("meta_info", {})
        out_lp = meta.get("output_token_logprobs")
        in_lp = meta.get("input_token_logprobs")
        return cls(prompt_index=prompt_index, sample_index=sample_index, output_ids=list(d.get("output_ids", [])),
                   text=d.get("text"), finish_reason=FinishReason.from_json(meta.get("finish_reason")),
                   prompt_tokens=meta.get("prompt_tokens", 0), completion_tokens=meta.get("completion_tokens", 0),
                   cached_tokens=meta.get("cached_tokens", 0), weight_version=meta.get("weight_version", ""),
                   output_logprobs=None if out_lp is None else [e[0] for e in out_lp],
                   output_weight_versions=meta.get("output_token_weight_versions"),
                   input_logprobs=None if in_lp is None else [e[0] for e in in_lp],
                   rid=meta.get("id", ""), server=server, meta_info=meta)

    @property
    def aborted(self) -> bool:
        return self.finish_reason.type == "abort"

    @property
    def routed_experts(self) -> Any:
        """With return_routed_experts=True (MoE models): torch.Tensor [tokens, MoE layers, top_k] (int64) of
        the experts of positions routed_experts_start_len .. prompt + output - 2, the rows
        `sync.routing_replay.replay_routing` takes for the sequence prompt + output[:-1]. None when absent."""
        data = self.meta_info.get("routed_experts")
        if data is None:
            return None
        from sync.routed_experts_codec import decode_routed_experts  # torch only when asked for
        return decode_routed_experts(data, self.meta_info["routed_experts_shape"])


class EncodeResult(msgspec.Struct):
    """One /encode or /classify item. For a reward model the reward is `embedding[0]` (`.reward`)."""
    embedding: list[float]
    prompt_tokens: int
    weight_version: str
    server: str
    meta_info: dict[str, Any]

    @property
    def reward(self) -> float:
        return self.embedding[0]

    @classmethod
    def from_json(cls, d: dict[str, Any], server: str) -> "EncodeResult":
        meta = d.get("meta_info", {})
        return cls(embedding=list(d["embedding"]), prompt_tokens=meta.get("prompt_tokens", 0),
                   weight_version=meta.get("weight_version", ""), server=server, meta_info=meta)


class ServerReply(msgspec.Struct):
    """A control call's answer from one server ({"success", "message"} routes; plain 200s too)."""
    url: str
    success: bool
    message: str
    seconds: float
    body: dict[str, Any] = msgspec.field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.url}: {'ok' if self.success else 'FAILED'} ({self.message})"
