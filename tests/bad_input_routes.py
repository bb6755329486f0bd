"""The table tests/test_bad_input.py walks: every route of the server with the methods it answers and a valid
request (bodies, query) that the bad-input classes mutate, plus cases aimed at bugs found by reading the code.

`app_routes` lists what the FastAPI app really serves, so a route added without a row here fails the suite.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from sync import encode_named_tensors
from tests.helpers import free_port

# The answers of these routes are in OpenAI's error shape {"error": {"message", "type", "param", "code"}}.
OPENAI_SHAPE = {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/v1/tokenize",
                "/v1/detokenize"}
# Routes that parse their bodies only on a --is-embedding server: walked on a tiny cross-encoder too.
SCORING_ROUTES = ["/encode", "/classify", "/v1/rerank", "/v1/embeddings"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]


@dataclass(frozen=True)
class Route:
    """`methods`: every method the app serves the path with (the first gets the field classes); `bodies`: valid
    JSON bodies (one per form of the route); `query`: a valid query string, whose parameters are mutated."""

    methods: tuple[str, ...]
    bodies: tuple[dict[str, Any], ...] = ({},)
    query: dict[str, str] = field(default_factory=dict)


def routes(model_dir: str) -> dict[str, Route]:
    """Every route with a valid request. A valid tensor update sends the checkpoint's own values, so the model
    serves the same tokens after it. Generation bodies ask for at most 2 new tokens, whichever field is dropped."""
    norm = torch.ones(32)
    if model_dir != "/m":
        from safetensors.torch import load_file
        norm = load_file(f"{model_dir}/model.safetensors")["model.norm.weight"]
    post, get = ("POST",), ("GET",)
    sampling = {"temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.0, "n": 1, "stop": ["zz"],
                "stop_token_ids": [2], "frequency_penalty": 0.1, "presence_penalty": 0.1, "repetition_penalty": 1.1,
                "ignore_eos": False, "skip_special_tokens": True, "logit_bias": {"5": 1.0}, "no_stop_trim": False}
    openai = {**sampling, "seed": 3, "min_tokens": 0, "stream": False, "model": "m", "user": "u",
              "return_token_ids": True, "rid": None}
    return {
        "/generate": Route(("POST", "PUT"), ({
            "text": "Hello there", "rid": "bad-input", "return_logprob": False, "logprob_start_len": -1,
            "top_logprobs_num": 0, "token_ids_logprob": [1], "return_text_in_logprobs": False, "stream": False,
            "sampling_params": {**sampling, "max_new_tokens": 2, "min_new_tokens": 0, "sampling_seed": 3}},)),
        "/tokenize": Route(post, ({"prompt": "Hello", "add_special_tokens": True},)),
        "/detokenize": Route(post, ({"tokens": [5, 6, 7], "skip_special_tokens": True},)),
        "/abort_request": Route(post, ({"rid": "nothing-running", "abort_all": False},)),
        "/flush_cache": Route(("POST", "GET"), ({"timeout": 1},), {"timeout": "1"}),
        "/v1/score": Route(post, ({"query": "Is it", "items": [" yes", " no"], "label_token_ids": [5, 6],
                                   "apply_softmax": True, "item_first": False},)),
        # The scoring routes' bodies are valid for the cross-encoder of SCORING_ROUTES (BERT's vocabulary).
        "/encode": Route(post, ({"text": "Hello", "rid": "bad-input-encode"}, {"input_ids": [[101, 7592, 102]]})),
        "/classify": Route(post, ({"text": ["Hello", "there"]},)),
        "/v1/rerank": Route(post, ({"query": "q", "documents": ["a", "b"], "top_n": 1, "return_documents": True,
                                    "model": "m"},)),
        "/update_weights_from_disk": Route(post, ({"model_path": model_dir, "weight_version": "disk",
                                                   "flush_cache": True, "abort_all_requests": False},)),
        "/update_weights_from_tensor": Route(post, ({"serialized_named_tensors": [encode_named_tensors(
            [("model.norm.weight", norm)])], "weight_version": "tensor", "flush_cache": True},)),
        # A free port: a body that turns out valid fails to join within its 0.5 s timeout, never blocks long
        # (about five of the walk's cases do; a longer wait only adds to the suite's time).
        "/init_weights_update_group": Route(post, ({"master_address": "127.0.0.1", "master_port": free_port(),
                                                    "rank_offset": 1, "world_size": 2, "backend": "gloo",
                                                    "group_name": "bad-input", "timeout": 0.5},)),
        "/update_weights_from_distributed": Route(post, ({"names": ["model.norm.weight"], "dtypes": ["float32"],
                                                          "shapes": [[32]], "group_name": "no-such-group"},)),
        "/destroy_weights_update_group": Route(post, ({"group_name": "no-such-group"},)),
        "/get_weights_by_name": Route(("POST", "GET"), ({"name": "model.norm.weight", "truncate_size": 4},)),
        "/update_weight_version": Route(post, ({"new_version": "v2", "abort_all_requests": False},)),
        "/pause_generation": Route(post, ({"mode": "retract"},)),
        "/continue_generation": Route(post),
        "/release_memory_occupation": Route(post, ({"tags": ["kv_cache"]},)),
        "/resume_memory_occupation": Route(post, ({"tags": ["kv_cache"]},)),
        # Info, load and monitoring routes (rollout/server/info_routes.py, http_server.py)
        "/get_model_info": Route(get), "/model_info": Route(get),
        "/get_server_info": Route(get), "/server_info": Route(get),
        "/health": Route(get), "/health_generate": Route(get),
        "/get_load": Route(get),
        "/v1/loads": Route(get, query={"include": "core,queues", "format": "json", "dp_rank": "0"}),
        "/get_weight_version": Route(get), "/weight_version": Route(get),
        "/metrics": Route(get),
        # OpenAI-compatible routes (rollout/server/openai_routes.py, tokenize_routes.py)
        "/v1/models": Route(get),
        "/v1/completions": Route(post, (
            {**openai, "prompt": "Hello", "max_tokens": 2, "logprobs": 2, "echo": False, "best_of": 1},
            {"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 1, "echo": True, "temperature": 0},
        )),
        "/v1/chat/completions": Route(post, ({
            **openai, "messages": CHAT, "max_tokens": 2, "max_completion_tokens": 2, "logprobs": True,
            "top_logprobs": 2, "response_format": {"type": "text"}, "chat_template_kwargs": {},
            "add_generation_prompt": True, "continue_final_message": False, "tools": None,
            "stream_options": {"include_usage": True}},)),
        "/v1/embeddings": Route(post, ({"input": "Hello", "encoding_format": "float", "model": "m", "rid": None},
                                       {"input": [[101, 7592, 102], [101, 102]], "encoding_format": "base64"})),
        "/v1/tokenize": Route(post, (
            {"prompt": ["Hello", "there"], "add_special_tokens": True, "return_token_strs": True, "model": "m"},
            {"messages": CHAT, "add_generation_prompt": True, "continue_final_message": False, "tools": [],
             "chat_template_kwargs": {}, "add_special_tokens": False, "return_token_strs": False},
        )),
        "/v1/detokenize": Route(post, ({"tokens": [[5, 6], [7]], "skip_special_tokens": True, "model": "m"},)),
        # Expert distribution record (rollout/server/expert_routes.py): a dense model answers 400 that says so.
        "/start_expert_distribution_record": Route(("POST", "GET")),
        "/stop_expert_distribution_record": Route(("POST", "GET")),
        "/dump_expert_distribution_record": Route(("POST", "GET")),
    }


# (class, field the 400 must name, body): each found a 5xx or a request that should have been refused.
TARGETED: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
    # Both overflowed the fp32 logits to inf: softmax NaN, and the scheduler died (every route then 503).
    "/generate": [
        ("subnormal repetition_penalty", "repetition_penalty",
         {"input_ids": [5, 6, 7], "sampling_params": {"repetition_penalty": 1e-320, "max_new_tokens": 2}}),
        ("logit_bias past fp32", "logit_bias",
         {"input_ids": [5, 6, 7], "sampling_params": {"logit_bias": {"5": 1e39}, "temperature": 0.5,
                                                      "max_new_tokens": 2}}),
    ],
    "/v1/completions": [
        ("n over --max-n", "n", {"prompt": "Hi", "max_tokens": 1, "n": 5000}),
        ("echo of a negative id", "prompt", {"prompt": [-1, 5], "echo": True, "max_tokens": 1}),
        ("echo of an id past 32 bits", "prompt", {"prompt": [[5], [2**40]], "echo": True, "max_tokens": 1}),
        ("int beyond 64 bits", "max_tokens", {"prompt": "Hi", "max_tokens": 2**70}),
        ("subnormal repetition_penalty", "repetition_penalty",
         {"prompt": "Hi", "max_tokens": 2, "repetition_penalty": 1e-320}),
    ],
    "/v1/chat/completions": [
        ("n over --max-n", "n", {"messages": CHAT, "max_tokens": 1, "n": 5000}),
        ("template kwargs that tokenize", "chat_template_kwargs",
         {"messages": CHAT, "max_tokens": 1, "chat_template_kwargs": {"tokenize": True}}),
        ("template kwargs that return a dict", "chat_template_kwargs",
         {"messages": CHAT, "max_tokens": 1, "chat_template_kwargs": {"return_dict": True, "tokenize": False}}),
    ],
    "/v1/tokenize": [
        ("template kwargs that tokenize", "chat_template_kwargs",
         {"messages": CHAT, "chat_template_kwargs": {"tokenize": True}}),
        ("both forms", "prompt", {"messages": CHAT, "prompt": "Hi"}),
    ],
    "/v1/detokenize": [("id past 32 bits", "tokens", {"tokens": [2**40]})],
}
# (class, parameter, query): query values that parse as digits but are not integers.
TARGETED_QUERY: dict[str, list[tuple[str, str, dict[str, str]]]] = {
    "/v1/loads": [("superscript digit", "dp_rank", {"dp_rank": "\u00b2"}),
                  ("arabic-indic digit", "dp_rank", {"dp_rank": "\u0663"}),
                  ("unknown format", "format", {"format": "xml"}),
                  ("unknown section", "include", {"include": "core,bogus"})],
    "/flush_cache": [("negative timeout", "timeout", {"timeout": "-1"}), ("nan timeout", "timeout", {"timeout": "nan"})],
}


def app_routes(model_dir: str) -> set[tuple[str, str]]:
    """(path, method) of every route the server's FastAPI app serves, built as launch_server builds it (the
    engine is not started: only the route table is read)."""
    from rollout.server.engine_client import EngineClient
    from rollout.server.http_server import create_app
    from rollout.server.launch_server import parse_args

    client = EngineClient(parse_args(["--model-path", model_dir, "--device", "cpu", "--enable-metrics"]))
    try:
        app = create_app(client)
    finally:
        if client.codec is not None:
            client.codec.close()
    return {(route.path, method) for route in app.routes for method in (getattr(route, "methods", None) or {"ANY"})}
