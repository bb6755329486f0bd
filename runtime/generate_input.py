"""Turns the fields of a /generate call (or Engine.generate) into per-sample scheduler requests.

Shared by the in-process Engine and the HTTP front end, so both validate the same way and raise
ValueError with the messages of API.md.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Callable

import msgspec

from runtime.grammar import check_grammar, grammar_spec
from runtime.messages import GenerateRequest
from runtime.sampling_params import SamplingParams


@dataclass
class GenerateInput:
    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    rid: str | list[str] | None = None
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    token_ids_logprob: list[int] | None = None
    return_text_in_logprobs: bool = False
    stream: bool = False
    return_sampling_mask: bool = False
    return_routed_experts: bool = False
    routed_experts_start_len: int = 0


@dataclass
class NormalizedGenerate:
    is_batch: bool
    requests: list[GenerateRequest]       # prompt-major: p0s0..p0s(n-1), p1s0, ...


def normalize_generate(inp: GenerateInput, tokenize: Callable[[str], list[int]] | None, vocab_size: int,
                       context_len: int) -> NormalizedGenerate:
    if (inp.text is None) == (inp.input_ids is None):
        raise ValueError("Either text, input_ids or input_embeds should be provided.")
    if inp.text is not None:
        if tokenize is None:
            raise ValueError("text was given but the server runs with --skip-tokenizer-init; send input_ids.")
        is_batch = isinstance(inp.text, list)
        texts = inp.text if is_batch else [inp.text]
        if is_batch and not texts:
            raise ValueError("text cannot be an empty list.")
        for t in texts:
            if not isinstance(t, str):
                raise ValueError(f"text must be a string or a list of strings, got {t!r}.")
        prompts = [tokenize(t) for t in texts]
        for i, p in enumerate(prompts):
            if not p:
                where = f"text[{i}]" if is_batch else "text"
                raise ValueError(f"{where}={_short(texts[i])} gives no tokens; send a non-empty prompt.")
    else:
        ids = inp.input_ids
        if not isinstance(ids, list):
            raise ValueError(f"input_ids must be a list of ints or a list of lists of ints, got {ids!r}.")
        if not ids:
            raise ValueError("input_ids cannot be empty.")
        is_batch = not isinstance(ids[0], int) or isinstance(ids[0], bool)
        prompts = ids if is_batch else [ids]
        for p in prompts:
            if not isinstance(p, list) or any(not isinstance(t, int) or isinstance(t, bool) for t in p):
                raise ValueError(f"input_ids must be a list of ints or a list of lists of ints, got {_short(p)}.")
    for p in prompts:
        if not p:
            raise ValueError("input_ids cannot be empty.")
        for t in p:
            if not 0 <= t < vocab_size:
                raise ValueError(f"input_ids contains token id {t}, outside the vocabulary [0, {vocab_size}).")
        if len(p) >= context_len:
            raise ValueError(f"The input ({len(p)} tokens) is longer than the model's context length "
                             f"({context_len} tokens).")

    sp_list = inp.sampling_params
    if isinstance(sp_list, list):
        if len(sp_list) != len(prompts):
            raise ValueError(f"sampling_params is a list of {len(sp_list)} but there are {len(prompts)} prompts.")
    else:
        sp_list = [sp_list] * len(prompts)
    for sp in sp_list:
        if sp is not None and not isinstance(sp, dict):
            raise ValueError(f"sampling_params must be an object, got {sp!r}.")
    params = [SamplingParams.from_dict(sp) for sp in sp_list]
    for sp in params:
        sp.validate(vocab_size)
        if grammar_spec(sp) is not None:
            if tokenize is None:
                raise ValueError("sampling_params.regex, json_schema and ebnf need the tokenizer; the server runs "
                                 "with --skip-tokenizer-init.")
            check_grammar(sp)

    if not isinstance(inp.logprob_start_len, int) or inp.logprob_start_len < -1:
        raise ValueError(f"logprob_start_len must be -1 or a position in the prompt, got {inp.logprob_start_len}.")
    for p in prompts:
        if inp.logprob_start_len >= len(p):
            raise ValueError(f"logprob_start_len must be -1 or in [0, {len(p)}), got {inp.logprob_start_len}.")
    if not isinstance(inp.top_logprobs_num, int) or inp.top_logprobs_num < 0:
        raise ValueError(f"top_logprobs_num must be a non-negative integer, got {inp.top_logprobs_num}.")
    if inp.token_ids_logprob is not None:
        for t in inp.token_ids_logprob:
            if not isinstance(t, int) or not 0 <= t < vocab_size:
                raise ValueError(f"token_ids_logprob contains {t!r}, outside the vocabulary [0, {vocab_size}).")

    if not isinstance(inp.return_routed_experts, bool):
        raise ValueError(f"return_routed_experts must be a boolean, got {inp.return_routed_experts!r}.")
    start = inp.routed_experts_start_len
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise ValueError(f"routed_experts_start_len must be a non-negative integer, got {start!r}.")
    for p in prompts:
        if start > len(p):
            raise ValueError(f"routed_experts_start_len must be in [0, {len(p)}] (the prompt's length), got {start}.")

    rids = _rids(inp.rid, is_batch, len(prompts))
    requests: list[GenerateRequest] = []
    for prompt, sp, rid in zip(prompts, params, rids):
        # The context bounds the output: cap max_new_tokens as SGLang does rather than fail late.
        room = context_len - len(prompt)
        if sp.max_new_tokens > room:
            sp.max_new_tokens = room
            sp.min_new_tokens = min(sp.min_new_tokens, room)
        for j in range(sp.n):
            requests.append(GenerateRequest(
                rid=rid if sp.n == 1 else f"{rid}_{j}", input_ids=prompt, sampling_params=_sibling_params(sp, j),
                return_logprob=inp.return_logprob, logprob_start_len=inp.logprob_start_len,
                top_logprobs_num=inp.top_logprobs_num, token_ids_logprob=inp.token_ids_logprob,
                stream=inp.stream, return_sampling_mask=inp.return_sampling_mask,
                return_routed_experts=inp.return_routed_experts, routed_experts_start_len=start))
    seen: set[str] = set()
    for r in requests:
        if r.rid in seen:
            raise ValueError(f"Duplicate request ID rid={r.rid!r} in one call.")
        seen.add(r.rid)
    return NormalizedGenerate(is_batch=is_batch or len(requests) > 1, requests=requests)


def check_routed_experts(inp: GenerateInput, is_moe: bool) -> None:
    """Routed experts exist only on a MoE model: asking a dense one is a clear error, not an empty answer."""
    if inp.return_routed_experts and not is_moe:
        raise ValueError("return_routed_experts=True needs a mixture-of-experts model; this model is dense "
                         "(no MoE layer routes tokens).")


def _sibling_params(sp: SamplingParams, j: int) -> SamplingParams:
    """Sample j of n: a seeded request gives each sibling its own seed (seed + j), so the n samples
    differ from each other yet are reproducible as a group."""
    if sp.n == 1 or sp.sampling_seed is None or j == 0:
        return sp
    return msgspec.structs.replace(sp, sampling_seed=(sp.sampling_seed + j) % (1 << 63))


def _rids(rid: str | list[str] | None, is_batch: bool, count: int) -> list[str]:
    if rid is None:
        return [uuid.uuid4().hex for _ in range(count)]
    if isinstance(rid, str):
        return [rid] if not is_batch else [f"{rid}_{i}" for i in range(count)]
    if isinstance(rid, list) and all(isinstance(r, str) for r in rid):
        if len(rid) != count:
            raise ValueError(f"rid is a list of {len(rid)} but there are {count} prompts.")
        return list(rid)
    raise ValueError(f"rid must be a string or a list of strings, got {rid!r}.")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
