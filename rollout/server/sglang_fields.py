"""Which fields of SGLang's current `GenerateReqInput` and `SamplingParams` /generate accepts, and how.

Clients built for SGLang, and sglang-router, send SGLang's fields at their defaults (`"model": null`,
`"log_metrics": true`, `"return_entropy": false`, ...). Every field SGLang knows is accepted: honoured
(parsed in rollout/server/schemas.py), ignored where it cannot change the answer here, or, for a feature
this server does not have, accepted only at its default so a real use is a clear 400. A field SGLang does
not know stays a 400 (a typo such as `return_logprobs` would otherwise be silently ignored).
docs/api.md lists the same tables.
"""

from __future__ import annotations

from typing import Any

# Top-level fields that change nothing here: accepted with any value.
IGNORED_GENERATE_FIELDS = frozenset({
    "model",              # one model per server; routers and OpenAI-style clients send its name or null
    "log_metrics",        # honoured by the front end: false keeps the request out of /metrics
    "no_logs", "conversation_id", "custom_labels", "extra_key", "priority", "session_id",
    "data_parallel_rank", "routed_dp_rank", "disagg_prefill_dp_rank", "routing_key", "kv_router_hint",
    "decode_tp_size", "received_time", "external_trace_header", "background", "http_worker_ipc",
    "return_bytes",       # (internal) image generation only
    "stream_interval",
})

# Top-level fields for features this server lacks, with SGLang's default: accepted when equal to it, or
# empty (null, false, 0, [], {}, ""); anything else is a 400 naming the field.
UNSUPPORTED_GENERATE_FIELDS: dict[str, Any] = {
    "input_embeds": None, "image_data": None, "video_data": None, "audio_data": None, "modalities": None,
    "mm_hashes": None, "mm_content_hashes": None, "use_audio_in_video": False, "video_config": None,
    "session_params": None, "lora_path": None, "lora_id": None,
    # Ships pickled Python code to run on the server: never accepted (docs/api.md).
    "custom_logit_processor": None,
    "positional_embed_overrides": None, "return_hidden_states": False, "return_indexer_topk": False,
    "bootstrap_host": None, "bootstrap_port": None, "bootstrap_room": None, "bootstrap_pair_key": None,
    "require_reasoning": False, "max_thinking_tokens": None, "return_entropy": False,
    "return_prompt_token_ids": False, "return_flat_raw_top_logprobs": False,
    "return_flat_raw_top_logprobs_b64": False, "need_wait_for_mm_inputs": None, "num_items_assigned": None,
    "encoder_urls": None, "max_dynamic_patch": None, "min_dynamic_patch": None,
    "image_max_dynamic_patch": None, "video_max_dynamic_patch": None, "images_config": None,
    "multi_item_delimiter_indices": None, "cache_salt": None,
}

# Sampling parameters of SGLang's SamplingParams that change nothing here: removed before parsing.
IGNORED_SAMPLING_PARAMS = frozenset({"stream_interval"})
# Sampling parameters for features this server lacks: accepted only empty (null, "", [], {}).
UNSUPPORTED_SAMPLING_PARAMS = frozenset({"stop_regex", "structural_tag", "custom_params"})

CUSTOM_LOGIT_PROCESSOR_REFUSED = ("custom_logit_processor is refused: it is a serialized Python object that "
                                  "would run code on the server.")


def is_empty(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {} or value == ""


def accepts_default(name: str, value: Any) -> bool:
    """Whether an unsupported top-level field is at its default (so the request needs nothing we lack)."""
    return is_empty(value) or value == UNSUPPORTED_GENERATE_FIELDS[name]


def strip_sampling_params(params: Any, short: Any) -> Any:
    """`params` (a dict, a list of dicts, or anything else, left for the parser to refuse) without the
    SGLang sampling parameters we ignore; ValueError naming an unsupported one that is not empty."""
    if isinstance(params, list):
        return [strip_sampling_params(p, short) for p in params]
    if not isinstance(params, dict):
        return params
    kept = {}
    for key, value in params.items():
        if key in IGNORED_SAMPLING_PARAMS:
            continue
        if key in UNSUPPORTED_SAMPLING_PARAMS:
            if not is_empty(value):
                raise ValueError(f"sampling_params.{key} is not supported by this server, got {short(value)}.")
            continue
        kept[key] = value
    return kept
