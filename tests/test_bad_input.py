"""The bad-input suite (issue 11): every route of the server, 40+ classes of malformed input, against one
real server on a tiny random Llama with its tokenizer (so the text routes run).

For every case: no 5xx; an error is JSON `{"error": {"message"}}` (or the `{"success": false,
"message"}` of the weight routes) that names the mutated field (or the body); and after each route's
cases the server still answers a greedy /generate with the same tokens as before.
Cases come from a table (body-level and field-level classes) plus a `hypothesis` walk of random JSON
bodies per route, derandomized so every run sends the same bodies.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import pytest
import requests
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sync import encode_named_tensors
from tests.helpers import ServerProcess, free_port, make_tiny_model_dir
from tests.server_checks import cpu_server

GREEDY = {"input_ids": [5, 6, 7, 8], "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-bad-input"), context_length=512)


@pytest.fixture(scope="module")
def server(model_dir: str, tmp_path_factory: pytest.TempPathFactory):
    log = str(tmp_path_factory.mktemp("bad-input-log") / "server.log")
    with cpu_server(model_dir, "--max-total-tokens", "8000", "--request-read-timeout", "5", log_path=log) as proc:
        proc.reference = proc.post("/generate", json=GREEDY).json()["output_ids"]
        yield proc


def routes(model_dir: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every POST route with a valid body (GET-only routes get the body-level classes). A valid tensor
    update sends the checkpoint's own values, so the model serves the same tokens after it."""
    norm = torch.ones(32)
    if model_dir != "/m":
        from safetensors.torch import load_file
        norm = load_file(f"{model_dir}/model.safetensors")["model.norm.weight"]
    return {
        "/generate": ("POST", {"text": "Hello there", "rid": "bad-input", "return_logprob": False,
                               "logprob_start_len": -1, "top_logprobs_num": 0, "token_ids_logprob": [1],
                               "return_text_in_logprobs": False, "stream": False,
                               "sampling_params": {"max_new_tokens": 2, "temperature": 0.5, "top_p": 0.9,
                                                   "top_k": 5, "min_p": 0.0, "n": 1, "stop": ["zz"],
                                                   "stop_token_ids": [2], "frequency_penalty": 0.1,
                                                   "presence_penalty": 0.1, "repetition_penalty": 1.1,
                                                   "min_new_tokens": 0, "ignore_eos": False,
                                                   "skip_special_tokens": True, "logit_bias": {"5": 1.0},
                                                   "sampling_seed": 3, "no_stop_trim": False}}),
        "/tokenize": ("POST", {"prompt": "Hello", "add_special_tokens": True}),
        "/detokenize": ("POST", {"tokens": [5, 6, 7], "skip_special_tokens": True}),
        "/abort_request": ("POST", {"rid": "nothing-running", "abort_all": False}),
        "/flush_cache": ("POST", {"timeout": 1}),
        "/v1/score": ("POST", {"query": "Is it", "items": [" yes", " no"], "label_token_ids": [5, 6],
                               "apply_softmax": True, "item_first": False}),
        "/encode": ("POST", {"text": "Hello"}),
        "/classify": ("POST", {"text": "Hello"}),
        "/v1/rerank": ("POST", {"query": "q", "documents": ["a"], "top_n": 1}),
        "/update_weights_from_disk": ("POST", {"model_path": model_dir, "weight_version": "disk",
                                               "flush_cache": True, "abort_all_requests": False}),
        "/update_weights_from_tensor": ("POST", {"serialized_named_tensors": [encode_named_tensors(
            [("model.norm.weight", norm)])], "weight_version": "tensor", "flush_cache": True}),
        # A free port: a body that turns out valid fails to join within its 2 s timeout, never blocks long.
        "/init_weights_update_group": ("POST", {"master_address": "127.0.0.1", "master_port": free_port(),
                                                "rank_offset": 1, "world_size": 2, "backend": "gloo",
                                                "group_name": "bad-input", "timeout": 2}),
        "/update_weights_from_distributed": ("POST", {"names": ["model.norm.weight"], "dtypes": ["float32"],
                                                      "shapes": [[32]], "group_name": "no-such-group"}),
        "/destroy_weights_update_group": ("POST", {"group_name": "no-such-group"}),
        "/get_weights_by_name": ("POST", {"name": "model.norm.weight", "truncate_size": 4}),
        "/update_weight_version": ("POST", {"new_version": "v2", "abort_all_requests": False}),
        "/pause_generation": ("POST", {"mode": "retract"}),
        "/continue_generation": ("POST", {}),
        "/release_memory_occupation": ("POST", {"tags": ["kv_cache"]}),
        "/resume_memory_occupation": ("POST", {"tags": ["kv_cache"]}),
        "/get_model_info": ("GET", {}),
        "/get_server_info": ("GET", {}),
        "/health": ("GET", {}),
        "/health_generate": ("GET", {}),
    }


# Fields whose every value is accepted or whose absence means a long default (a 300 s group join).
NOT_MUTATED = {"/init_weights_update_group": {"timeout"}}

# --- the classes ------------------------------------------------------------------------------------
# Body-level: (name, raw body, content type). The error must name the body (or JSON) when it is a 4xx.
JSON = "application/json"
BODY_CLASSES: list[tuple[str, bytes, str]] = [
    ("not json", b"hello there", JSON),
    ("truncated json", b'{"text": "a', JSON),
    ("json array", b"[1, 2, 3]", JSON),
    ("json string", b'"text"', JSON),
    ("json number", b"42", JSON),
    ("json null", b"null", JSON),
    ("nan literal", b'{"x": NaN}', JSON),
    ("infinity literal", b'{"x": Infinity}', JSON),
    ("number beyond float", b'{"x": 1e999}', JSON),
    ("invalid utf-8", b'{"text": "\xff\xfe\xfa"}', JSON),
    ("utf-8 bom", b'\xef\xbb\xbf{"text": "a"}', JSON),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, JSON),
    ("huge top-level array", b"[" + b"1," * 1_000_000 + b"1]", JSON),
    ("form encoded", b"text=hello&rid=1", "application/x-www-form-urlencoded"),
    ("xml", b"<generate><text>hi</text></generate>", "application/xml"),
    ("binary zeros", b"\x00" * 1000, "application/octet-stream"),
    ("trailing garbage", b'{"text": "a"} xyz', JSON),
    ("single quotes", b"{'text': 'a'}", JSON),
]

# Field-level: (name, value). Each replaces one field of a valid body (or one sampling parameter).
FIELD_CLASSES: list[tuple[str, Any]] = [
    ("null", None), ("string", "not-a-number"), ("empty string", ""), ("int", 7), ("negative int", -5),
    ("huge int", 2**70), ("huge negative int", -(2**70)), ("float", 1.5), ("negative float", -1e30),
    ("tiny float", 1e-320), ("true", True), ("false", False), ("empty list", []), ("list of nulls", [None, None]),
    ("nested lists", [[[1]], [[2]]]), ("list of strings", ["a", "b"]), ("dict", {"a": 1}), ("empty dict", {}),
    ("numeric string", "5"), ("lone surrogate", "\ud800"), ("control chars", "\x00\x01\x1b[31m"),
    ("long string", "y" * 100_000), ("huge array", list(range(200_000))), ("unicode garbage", "\u202e\ufffd\U0001f4a9"),
]
SHAPE_CLASSES = ["missing field", "duplicate key", "unknown key"]


def total_classes() -> int:
    return len(BODY_CLASSES) + len(FIELD_CLASSES) + len(SHAPE_CLASSES)


def field_cases(body: dict[str, Any], spread: int = 3) -> list[tuple[str, str, bytes]]:
    """(class, mutated field, raw body): every field (and sampling parameter) of a valid body goes missing,
    and every field class lands on `spread` fields (round robin), so each route sees every class."""
    out = []
    targets = [(k, None) for k in body] + [(k, "sampling_params") for k in body.get("sampling_params", {})]
    for j, (cls, value) in enumerate(FIELD_CLASSES):
        for r in range(min(spread, len(targets))):
            field, parent = targets[(j + r) % len(targets)]
            mutated = json.loads(json.dumps(body))
            (mutated[parent] if parent else mutated)[field] = value
            out.append((cls, field, json.dumps(mutated).encode()))
    for field, parent in targets:
        mutated = json.loads(json.dumps(body))
        del (mutated[parent] if parent else mutated)[field]
        out.append(("missing field", field, json.dumps(mutated).encode()))
    if body:
        first = next(iter(body))
        text = json.dumps(body)
        out.append(("duplicate key", first, (text[:-1] + f', "{first}": 12345}}').encode()))
    out.append(("unknown key", "zz_unknown", json.dumps({**body, "zz_unknown": [1, {"a": None}]}).encode()))
    return out


def error_message(resp: requests.Response) -> str | None:
    """The message of an error answer, or None when it is not in a JSON error shape."""
    try:
        data = resp.json()
    except ValueError:
        return None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return data["error"].get("message")
    if isinstance(data, dict) and data.get("success") is False:
        return data.get("message")
    return None


def send(server: ServerProcess, method: str, path: str, raw: bytes, ctype: str) -> requests.Response:
    return requests.request(method, server.url + path, data=raw, headers={"Content-Type": ctype}, timeout=120)


def check(resp: requests.Response, where: str, names: Callable[[str], bool]) -> None:
    assert resp.status_code < 500, (where, resp.status_code, resp.text[:400])
    if resp.status_code >= 400:
        message = error_message(resp)
        assert isinstance(message, str) and message, (where, resp.status_code, resp.text[:400])
        assert names(message), (where, message[:400])


def restore(server: ServerProcess, model_dir: str, weights: bool = False) -> None:
    """Undo what a case that turned out valid may have changed: paused generation, released memory (on
    the CPU released weights are dropped, so they are loaded again from disk)."""
    requests.post(server.url + "/continue_generation", json={}, timeout=120)
    requests.post(server.url + "/resume_memory_occupation", json={}, timeout=120)
    if weights:
        resp = requests.post(server.url + "/update_weights_from_disk", json={"model_path": model_dir}, timeout=300)
        assert resp.status_code == 200, resp.text


def still_serves(server: ServerProcess, where: str) -> None:
    resp = server.post("/generate", json=GREEDY)
    assert resp.status_code == 200, (where, resp.text)
    assert resp.json()["output_ids"] == server.reference, where


def names_body(message: str) -> bool:
    lowered = message.lower()
    return any(w in lowered for w in ("body", "json", "required", "must", "either text", "nested", "not supported",
                                      "needs", "embedding", "cross-encoder", "unknown field"))


def names_field(message: str, field: str, resp: requests.Response) -> bool:
    """A field error names the field (`items[0]`-style or singular counts). A weight route's body that
    passed the schema and failed to apply answers `{"success": false}` in API.md's fixed wording, which
    names what it could not use (the path, the group, the rank) rather than the field."""
    if field.rstrip("s") in message or names_body(message) or (field == "zz_unknown" and "Unknown" in message):
        return True
    body = resp.json()
    return isinstance(body, dict) and body.get("success") is False and message.startswith("Failed to")


def test_there_are_at_least_40_classes():
    assert total_classes() >= 40, total_classes()


@pytest.mark.parametrize("path", list(routes("/m")))
def test_every_route_refuses_malformed_input(server, model_dir, path):
    method, body = routes(model_dir)[path]
    for cls, raw, ctype in BODY_CLASSES:
        resp = send(server, method, path, raw, ctype)
        check(resp, f"{path} {cls}", names_body)
    if method == "POST":
        skip = NOT_MUTATED.get(path, set())
        for cls, field, raw in field_cases(body):
            if field in skip:
                continue
            resp = send(server, method, path, raw, JSON)
            check(resp, f"{path} {field}={cls}", lambda m, f=field, r=resp: names_field(m, f, r))
            if path in ("/pause_generation", "/release_memory_occupation"):
                restore(server, model_dir, weights=path == "/release_memory_occupation")
    restore(server, model_dir)
    still_serves(server, path)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=4), max_leaves=12)


@pytest.mark.parametrize("path", ["/generate", "/tokenize", "/detokenize", "/v1/score", "/get_weights_by_name",
                                  "/update_weight_version", "/update_weights_from_tensor", "/abort_request"])
def test_random_bodies_never_5xx(server, model_dir, path):
    _, valid = routes(model_dir)[path]
    fields = sorted(valid) + ["sampling_params"] * (path == "/generate")

    @settings(max_examples=15, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.dictionaries(st.sampled_from(fields), JSON_VALUES, max_size=len(fields)))
    def one(body: dict) -> None:
        resp = requests.post(server.url + path, json=body, timeout=120)
        assert resp.status_code < 500, (body, resp.status_code, resp.text[:300])
        if resp.status_code >= 400:
            assert error_message(resp), (body, resp.text[:300])

    one()
    restore(server, model_dir)
    still_serves(server, path)
