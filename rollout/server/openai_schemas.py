"""Request bodies of the OpenAI-compatible routes (/v1/completions, /v1/chat/completions, /v1/embeddings).

msgspec structs type-check the fields OpenAI defines plus SGLang's and vLLM's extensions; this module
adds the unknown-field policy of /generate (a field neither knows is a 400 naming it; fields for features
we lack are accepted only empty) and turns a request into /generate's sampling parameters.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from rollout.server.schemas import MAX_SAMPLES_PER_CALL, BadRequest, check_ints, short
from rollout.server.sglang_fields import is_empty


class OpenAIBadRequest(BadRequest):
    """A 400 on an OpenAI route; `param` names the request field (OpenAI's error shape)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(msgspec.Struct, kw_only=True):
    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # SGLang's and vLLM's extensions (their sampling parameters by their /generate names)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: int | None = None
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    rid: str | None = None
    # Token ids for agentic RL: vLLM's flag, and SGLang's two flags (the response's `sglext`)
    return_token_ids: bool = False
    return_input_ids_in_sglext: bool = False
    return_output_ids_in_sglext: bool = False


class CompletionRequest(_SamplingFields, kw_only=True):
    prompt: Any                       # str | list[str] | list[int] | list[list[int]]: checked by prompts()
    max_tokens: int | None = 16       # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: list[dict[str, Any]]
    max_tokens: int | None = None     # None: up to the context length
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    response_format: dict[str, Any] | None = None


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    input: Any                        # str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: str = "float"
    rid: str | None = None


# Fields that change nothing here: accepted with any value (OpenAI's bookkeeping, SGLang's and
# sglang-router's flags about logging, reasoning parsers and routing).
IGNORED_FIELDS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "reasoning_effort",
                  "separate_reasoning", "stream_reasoning", "log_metrics", "no_logs", "priority", "extra_key",
                  "cache_salt", "routing_key", "routed_dp_rank", "data_parallel_rank", "custom_labels",
                  "request_id", "return_meta_info", "dimensions"}
# Fields for features we lack: accepted only empty (null, false, [], {}, "").
UNSUPPORTED_FIELDS = {"suffix", "functions", "function_call", "modalities", "audio", "prediction",
                      "return_hidden_states", "return_routed_experts", "lora_path", "session_params",
                      "custom_logit_processor", "custom_params", "bootstrap_host", "bootstrap_port",
                      "bootstrap_room", "prompt_logprobs", "web_search_options", "input_embeds"}
MAX_TOP_LOGPROBS = 20

_error_path = re.compile(r"at `\$\.?([A-Za-z0-9_]*)")


def parse_request(body: dict[str, Any], cls: type[msgspec.Struct]) -> Any:
    """Type-check `body` as `cls`; unknown fields and wrong types are an OpenAIBadRequest naming them."""
    known = set(cls.__struct_fields__)
    for key, value in body.items():
        if key in known or key in IGNORED_FIELDS:
            continue
        if key in UNSUPPORTED_FIELDS:
            if not is_empty(value):
                raise OpenAIBadRequest(f"{key} is not supported by this server, got {key}={short(value)}.", key)
            continue
        raise OpenAIBadRequest(f"Unknown field in the request body: {key}={short(value)}.", key)
    fields = {k: v for k, v in body.items() if k in known}
    for key, value in fields.items():
        try:
            check_ints(key, value)
        except BadRequest as e:
            raise OpenAIBadRequest(str(e), key) from None
    try:
        return msgspec.convert(fields, cls)
    except msgspec.ValidationError as e:
        match = _error_path.search(str(e))
        param = match.group(1) if match else None
        got = f" (got {param}={short(body.get(param))})" if param in body else ""
        raise OpenAIBadRequest(f"Invalid request: {e}{got}.", param) from None


def _check_range(name: str, value: int | None, low: int, high: int) -> None:
    if value is not None and not low <= value <= high:
        raise OpenAIBadRequest(f"{name} must be in [{low}, {high}], got {value}.", name)


def check_prompt_ids(ids: list[list[int]], vocab_size: int) -> None:
    """Token-id prompts are checked before anything decodes them (echo): the tokenizer's decode raises on
    ids it cannot hold (negative, past 32 bits)."""
    for i, p in enumerate(ids):
        for t in p:
            if not 0 <= t < vocab_size:
                where = f"prompt[{i}]" if len(ids) > 1 else "prompt"
                raise OpenAIBadRequest(f"{where} contains token id {t}, outside the vocabulary [0, {vocab_size}).",
                                       "prompt")


def prompts(req: CompletionRequest) -> tuple[list[str] | None, list[list[int]] | None]:
    """The prompts of a completion request: texts, or token-id lists (exactly one is not None)."""
    p = req.prompt
    if isinstance(p, str):
        return [p], None
    if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        return list(p), None
    if isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        return None, [list(p)]
    if isinstance(p, list) and p and all(isinstance(x, list) and x for x in p) and \
            all(isinstance(t, int) and not isinstance(t, bool) for x in p for t in x):
        return None, [list(x) for x in p]
    raise OpenAIBadRequest("prompt must be a string, a list of strings, a list of token ids or a list of such "
                           f"lists (none empty), got {short(p)}.", "prompt")


def sampling_params(req: _SamplingFields, max_tokens: int | None, context_len: int, num_prompts: int,
                    max_n: int | None = None) -> dict:
    """/generate's sampling_params for an OpenAI request (None max_tokens: up to the context; `max_n`: the
    server's --max-n, as /generate's)."""
    if max_tokens is not None and max_tokens < 1:
        raise OpenAIBadRequest(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
    if req.n < 1:
        raise OpenAIBadRequest(f"n must be at least 1, got {req.n}.", "n")
    if max_n is not None and req.n > max_n:
        raise OpenAIBadRequest(f"n must be at most {max_n} (--max-n), got {req.n}.", "n")
    if req.n * num_prompts > MAX_SAMPLES_PER_CALL:
        raise OpenAIBadRequest(f"n={req.n} over {num_prompts} prompts asks for {req.n * num_prompts} samples; at "
                               f"most {MAX_SAMPLES_PER_CALL} per call.", "n")
    sp: dict[str, Any] = {"max_new_tokens": max_tokens if max_tokens is not None else context_len, "n": req.n,
                          "ignore_eos": req.ignore_eos, "skip_special_tokens": req.skip_special_tokens,
                          "spaces_between_special_tokens": req.spaces_between_special_tokens,
                          "no_stop_trim": req.no_stop_trim}
    optional = {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "min_p": req.min_p,
                "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
                "repetition_penalty": req.repetition_penalty, "min_new_tokens": req.min_tokens,
                "stop": req.stop, "stop_token_ids": req.stop_token_ids,
                "regex": req.regex, "json_schema": req.json_schema, "ebnf": req.ebnf}
    sp.update({k: v for k, v in optional.items() if v is not None})
    if req.seed is not None and req.sampling_seed is not None and req.seed != req.sampling_seed:
        raise OpenAIBadRequest(f"seed={req.seed} and sampling_seed={req.sampling_seed} differ; send one.", "seed")
    seed = req.seed if req.seed is not None else req.sampling_seed
    if seed is not None:
        sp["sampling_seed"] = seed % (1 << 63)  # OpenAI seeds may be negative; ours are non-negative
    if req.logit_bias:
        bias: dict[int, float] = {}
        for key, value in req.logit_bias.items():
            try:
                bias[int(key)] = value
            except ValueError:
                raise OpenAIBadRequest(f"logit_bias keys must be token ids, got {key!r}.", "logit_bias") from None
        sp["logit_bias"] = bias
    return sp


def completion_logprobs(req: CompletionRequest) -> int | None:
    """How many top logprobs per token a completion asks for (None: no logprobs)."""
    _check_range("logprobs", req.logprobs, 0, MAX_TOP_LOGPROBS)
    if req.echo and req.logprobs is not None:
        raise OpenAIBadRequest("echo with logprobs (prompt logprobs) is not supported; use /generate with "
                               "logprob_start_len=0.", "echo")
    if req.best_of is not None and req.best_of != req.n:
        raise OpenAIBadRequest(f"best_of must equal n (no server-side ranking), got best_of={req.best_of}, "
                               f"n={req.n}.", "best_of")
    return req.logprobs


def chat_logprobs(req: ChatCompletionRequest) -> int | None:
    _check_range("top_logprobs", req.top_logprobs, 0, MAX_TOP_LOGPROBS)
    if req.top_logprobs and not req.logprobs:
        raise OpenAIBadRequest("top_logprobs needs logprobs=true.", "top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None


def chat_max_tokens(req: ChatCompletionRequest) -> int | None:
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise OpenAIBadRequest(f"max_tokens={req.max_tokens} and max_completion_tokens={req.max_completion_tokens}"
                               " differ; send one.", "max_completion_tokens")
    return req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens


def response_format_schema(req: ChatCompletionRequest) -> str | None:
    """OpenAI's response_format as SGLang's json_schema sampling parameter (None for plain text)."""
    fmt = req.response_format
    if not fmt or fmt.get("type") in (None, "text"):
        return None
    if fmt.get("type") == "json_object":
        return '{"type": "object"}'
    if fmt.get("type") == "json_schema" and isinstance(fmt.get("json_schema"), dict) \
            and isinstance(fmt["json_schema"].get("schema"), dict):
        return msgspec.json.encode(fmt["json_schema"]["schema"]).decode()
    raise OpenAIBadRequest(f"response_format must be text, json_object or json_schema with a schema, got "
                           f"{short(fmt)}.", "response_format")
