"""Request bodies of the HTTP API: parsed and checked by hand, so every bad body is a 400 naming the
field and the value (never FastAPI's 422), with the messages of API.md.

/generate's sampling and prompt checks live in runtime/generate_input.py (shared with the in-process
Engine); this module checks the body's shape and the top-level fields before handing it there.
"""

from __future__ import annotations

from typing import Any

import msgspec

from rollout.server.sglang_fields import (CUSTOM_LOGIT_PROCESSOR_REFUSED, IGNORED_GENERATE_FIELDS,
                                          UNSUPPORTED_GENERATE_FIELDS, accepts_default, strip_sampling_params)
from runtime.generate_input import GenerateInput

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# One /generate call expands into prompts x n samples; past this many it is refused up front.
MAX_SAMPLES_PER_CALL = 65536
# Deeper JSON than this is refused: no field of the API nests past 4, and deep nesting costs recursion.
MAX_JSON_DEPTH = 64

_json_decoder = msgspec.json.Decoder()


class BadRequest(ValueError):
    """A body we cannot serve: HTTP 400 with {"error": {"message": ...}}."""


def short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_json_body(body: bytes, allow_empty: bool = False) -> dict[str, Any]:
    if not body.strip():
        if allow_empty:
            return {}
        raise BadRequest("The request body is empty; expected a JSON object.")
    obj = decode_json(body)
    if not isinstance(obj, dict):
        raise BadRequest(f"The request body must be a JSON object, got {type(obj).__name__}: {short(obj)}.")
    return obj


def decode_json(text: bytes) -> Any:
    """Any JSON value; BadRequest on bad syntax or nesting deeper than MAX_JSON_DEPTH."""
    try:
        obj = _json_decoder.decode(text)
    except msgspec.MsgspecError as e:  # syntax, or a number beyond float range (1e999)
        raise BadRequest(f"The request body is not valid JSON: {e}.") from None
    except RecursionError:
        raise BadRequest(f"The request body is nested too deeply (at most {MAX_JSON_DEPTH} levels).") from None
    # A body with fewer brackets than the limit cannot be too deep: only walk the rest.
    if text.count(b"[") + text.count(b"{") > MAX_JSON_DEPTH and json_depth(obj) > MAX_JSON_DEPTH:
        raise BadRequest(f"The request body is nested too deeply (at most {MAX_JSON_DEPTH} levels).")
    return obj


def json_depth(obj: Any) -> int:
    """Nesting depth of decoded JSON (iterative: no recursion however deep)."""
    deepest = 0
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            value = value.values()
        elif not isinstance(value, list):
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            return deepest
        stack.extend((v, depth + 1) for v in value if isinstance(v, (list, dict)))
    return deepest


# --- /generate ------------------------------------------------------------------------------------

GENERATE_FIELDS = {"text", "input_ids", "sampling_params", "rid", "return_logprob", "logprob_start_len",
                   "top_logprobs_num", "token_ids_logprob", "return_text_in_logprobs", "stream",
                   "return_sampling_mask", "return_routed_experts", "routed_experts_start_len"}
# SGLang's other GenerateReqInput fields (rollout/server/sglang_fields.py); also used by /encode's parser.
SGLANG_IGNORED_FIELDS = IGNORED_GENERATE_FIELDS
SGLANG_UNSUPPORTED_FIELDS = UNSUPPORTED_GENERATE_FIELDS


def _uniform(name: str, value: Any, count: int) -> Any:
    """SGLang allows a per-prompt list for some fields; we take one only when every entry is the same."""
    if isinstance(value, list):
        if not value:
            raise BadRequest(f"{name} cannot be an empty list.")
        if len(value) != count:
            raise BadRequest(f"{name} is a list of {len(value)} but there are {count} prompts.")
        if any(v != value[0] or type(v) is not type(value[0]) for v in value[1:]):
            raise BadRequest(f"{name} must be the same for every prompt of a call, got {short(value)}.")
        return value[0]
    return value


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be a boolean, got {short(value)}.")
    return value


def _int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"{name} must be an integer, got {short(value)}.")
    if not INT64_MIN <= value <= INT64_MAX:
        raise BadRequest(f"{name} is out of range (64-bit integers), got {value}.")
    return value


def check_ints(prefix: str, value: Any) -> None:
    """No integer beyond 64 bits gets past the front end (the engine's wire format is msgpack)."""
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise BadRequest(f"{prefix} is out of range (64-bit integers), got {value}.")
    elif isinstance(value, list):
        for v in value:
            check_ints(prefix, v)
    elif isinstance(value, dict):
        for k, v in value.items():
            check_ints(f"{prefix}.{k}", v)


def _num_prompts(body: dict[str, Any]) -> int:
    text, ids = body.get("text"), body.get("input_ids")
    if isinstance(text, list):
        return len(text)
    if isinstance(ids, list) and ids and isinstance(ids[0], list):
        return len(ids)
    return 1


def parse_generate(body: dict[str, Any], vocab_size: int, max_n: int | None = None) -> GenerateInput:
    """`max_n`: the server's cap on sampling_params.n (--max-n)."""
    for key, value in body.items():
        if key in GENERATE_FIELDS or key in SGLANG_IGNORED_FIELDS:
            continue
        if key in SGLANG_UNSUPPORTED_FIELDS:
            if key == "custom_logit_processor" and not accepts_default(key, value):
                raise BadRequest(f"{CUSTOM_LOGIT_PROCESSOR_REFUSED} Got custom_logit_processor={short(value)}.")
            if not accepts_default(key, value):
                raise BadRequest(f"{key} is not supported by this server, got {key}={short(value)}.")
            continue
        raise BadRequest(f"Unknown field in the request body: {key}={short(value)}.")

    count = _num_prompts(body)
    inp = GenerateInput(text=body.get("text"), input_ids=body.get("input_ids"), rid=body.get("rid"))

    sp = body.get("sampling_params")
    if sp is not None and not isinstance(sp, (dict, list)):
        raise BadRequest(f"sampling_params must be an object (or a list of objects, one per prompt), got {short(sp)}.")
    check_ints("sampling_params", sp)
    try:
        sp = strip_sampling_params(sp, short)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    most_n = 1
    for one in sp if isinstance(sp, list) else [sp]:
        if isinstance(one, dict) and isinstance(one.get("n"), int):
            most_n = max(most_n, one["n"])
    if max_n is not None and most_n > max_n:
        raise BadRequest(f"sampling_params.n must be at most {max_n} (--max-n), got {most_n}.")
    if count * most_n > MAX_SAMPLES_PER_CALL:
        raise BadRequest(f"sampling_params.n={most_n} over {count} prompts asks for {count * most_n} samples; "
                         f"at most {MAX_SAMPLES_PER_CALL} per call.")
    inp.sampling_params = sp

    if "return_logprob" in body:
        inp.return_logprob = _bool("return_logprob", _uniform("return_logprob", body["return_logprob"], count))
    if "logprob_start_len" in body and body["logprob_start_len"] is not None:
        inp.logprob_start_len = _int("logprob_start_len", _uniform("logprob_start_len", body["logprob_start_len"], count))
    if "top_logprobs_num" in body and body["top_logprobs_num"] is not None:
        k = _int("top_logprobs_num", _uniform("top_logprobs_num", body["top_logprobs_num"], count))
        if k > vocab_size:
            raise BadRequest(f"top_logprobs_num must be at most the vocabulary size ({vocab_size}), got {k}.")
        inp.top_logprobs_num = k
    ids = body.get("token_ids_logprob")
    if ids is not None:
        if isinstance(ids, list) and ids and all(isinstance(x, list) for x in ids):
            ids = _uniform("token_ids_logprob", ids, count)
        if not isinstance(ids, list) or any(not isinstance(t, int) or isinstance(t, bool) for t in ids):
            raise BadRequest(f"token_ids_logprob must be a list of token ids, got {short(ids)}.")
        inp.token_ids_logprob = ids
    if "return_text_in_logprobs" in body:
        inp.return_text_in_logprobs = _bool("return_text_in_logprobs", body["return_text_in_logprobs"])
    if "stream" in body:
        inp.stream = _bool("stream", body["stream"])
    if body.get("return_sampling_mask") is not None:
        inp.return_sampling_mask = _bool("return_sampling_mask",
                                         _uniform("return_sampling_mask", body["return_sampling_mask"], count))
    if body.get("return_routed_experts") is not None:
        inp.return_routed_experts = _bool("return_routed_experts",
                                          _uniform("return_routed_experts", body["return_routed_experts"], count))
    start = body.get("routed_experts_start_len")
    if start is not None:
        inp.routed_experts_start_len = _int("routed_experts_start_len",
                                            _uniform("routed_experts_start_len", start, count))
    return inp


# --- other routes ---------------------------------------------------------------------------------


def parse_tokenize(body: dict[str, Any]) -> tuple[str | list[str], bool]:
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(p, str) for p in prompt):
            raise BadRequest(f"prompt must be a string or a non-empty list of strings, got {short(prompt)}.")
    elif not isinstance(prompt, str):
        raise BadRequest(f"prompt must be a string or a list of strings, got {short(prompt)}.")
    return prompt, _bool("add_special_tokens", body.get("add_special_tokens", True))


def parse_detokenize(body: dict[str, Any], vocab_size: int) -> tuple[list[int] | list[list[int]], bool]:
    tokens = body.get("tokens")
    if not isinstance(tokens, list):
        raise BadRequest(f"tokens must be a list of token ids (or a list of such lists), got {short(tokens)}.")
    batch = bool(tokens) and isinstance(tokens[0], list)
    for seq in tokens if batch else [tokens]:
        if not isinstance(seq, list):
            raise BadRequest(f"tokens must be a list of token ids (or a list of such lists), got {short(tokens)}.")
        for t in seq:
            if not isinstance(t, int) or isinstance(t, bool):
                raise BadRequest(f"tokens must hold integer token ids, got {short(t)}.")
            if not 0 <= t < vocab_size:
                raise BadRequest(f"tokens contains token id {t}, outside the vocabulary [0, {vocab_size}).")
    return tokens, _bool("skip_special_tokens", body.get("skip_special_tokens", True))


def parse_abort(body: dict[str, Any]) -> tuple[str, bool]:
    rid = body.get("rid", "")
    if rid is None:
        rid = ""
    if not isinstance(rid, str):
        raise BadRequest(f"rid must be a string (an rid or an rid prefix), got {short(rid)}.")
    return rid, _bool("abort_all", body.get("abort_all", False))


def parse_timeout(value: Any, name: str = "timeout") -> float:
    if value is None:
        return 0.0
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise BadRequest(f"{name} must be a number of seconds, got {short(value)}.") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 3600:
        raise BadRequest(f"{name} must be a number of seconds in [0, 3600], got {short(value)}.")
    return float(value)
