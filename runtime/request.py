"""One sample being generated: its tokens, where its KV lives, and what it still owes the client."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from runtime.messages import GenerateRequest
from runtime.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    seed: int
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    token_ids_logprob: list[int] | None = None
    stream: bool = False
    return_sampling_mask: bool = False
    grammar: Any = None  # a RequestGrammar (runtime/grammar.py) for a constrained request
    return_routed_experts: bool = False
    routed_experts_start_len: int = 0
    arrival: float = field(default_factory=time.monotonic)

    output_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: dict | None = None
    aborted: bool = False

    # KV: slots of tokens [0, kv_len) sit in row `req_pool_row` of the request-to-token table.
    # [0, prefix_len) belong to the radix cache (locked through `last_node`), the rest to this request.
    req_pool_row: int | None = None
    kv_len: int = 0
    prefix_len: int = 0
    last_node: Any = None
    cached_tokens: int = 0
    admitted_once: bool = False
    kv_stale: bool = False  # KV computed under weights since replaced: used by this request, never cached

    # Logprobs of prompt positions, filled chunk by chunk during the first prefill.
    input_logprobs_pending: bool = False
    input_token_logprobs: list[float | None] = field(default_factory=list)
    input_top_logprobs: list[Any] = field(default_factory=list)
    input_token_ids_logprobs: list[Any] = field(default_factory=list)

    # Per output token, when the request asked for logprobs.
    output_token_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[Any] = field(default_factory=list)
    output_token_ids_logprobs: list[Any] = field(default_factory=list)
    output_weight_versions: list[str] = field(default_factory=list)
    output_sampling_masks: list[list[int] | None] = field(default_factory=list)

    # An EmbedRequest: no token is sampled; the head's output at the last prompt token is the answer.
    embed: bool = False
    embedding: list[float] | None = None

    # Read from the KV slots' routing when the request finishes (before its slots are released).
    routed_experts: Any = None   # torch.Tensor [tokens, MoE layers, top_k] int16

    # How many output tokens the front end has been sent, and whether it has the input logprobs.
    sent_tokens: int = 0
    sent_input_logprobs: bool = False

    @classmethod
    def from_message(cls, msg: GenerateRequest, seed: int) -> "Request":
        req = cls(rid=msg.rid, input_ids=list(msg.input_ids), sampling_params=msg.sampling_params, seed=seed,
                  return_logprob=msg.return_logprob, logprob_start_len=msg.logprob_start_len,
                  top_logprobs_num=msg.top_logprobs_num, token_ids_logprob=msg.token_ids_logprob,
                  stream=msg.stream, return_sampling_mask=msg.return_sampling_mask,
                  return_routed_experts=msg.return_routed_experts,
                  routed_experts_start_len=msg.routed_experts_start_len)
        req.input_logprobs_pending = msg.return_logprob and msg.logprob_start_len >= 0
        return req

    @property
    def fill_ids(self) -> list[int]:
        """Every token whose KV the request needs: prompt plus output (after a retraction, both)."""
        return self.input_ids + self.output_ids

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to run through the model before the next token can be sampled.

        1 means a plain decode step (the newest token); more means prompt (or, after a retraction,
        prompt and output) still to prefill.
        """
        return len(self.input_ids) + len(self.output_ids) - self.kv_len

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
