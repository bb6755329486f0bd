"""The HTTP server end to end: `python -m rollout.launch_server` in a subprocess on a tiny random Llama
(SmolLM2's tokenizer), every route of API.md this server has, its invariants, its errors, aborts and
disconnects, and 200 concurrent requests that leave the KV pool and radix cache idle and clean.
"""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from transformers import AutoTokenizer

from rollout.server.http_server import FLUSH_OK_TEXT
from tests.helpers import ServerProcess
from tests.server_checks import ok

CONTEXT = 4096
MODEL_INFO_KEYS = {"model_path", "tokenizer_path", "is_generation", "preferred_sampling_params", "weight_version",
                   "has_image_understanding", "has_audio_understanding", "model_type", "architectures"}
PROMPT = "The quick brown fox jumps over the lazy dog. " * 6   # ~60 tokens: long enough to share a prefix


@pytest.fixture(scope="module")
def model_dir(tiny_llm_dir: str) -> str:
    return tiny_llm_dir  # tests/conftest.py: the model tiny_llm_server serves


@pytest.fixture(scope="module")
def server(tiny_llm_server: ServerProcess) -> ServerProcess:
    return tiny_llm_server  # tests/conftest.py: one server for the modules that only read from it


@pytest.fixture(scope="module")
def tokenizer(model_dir: str):
    return AutoTokenizer.from_pretrained(model_dir)


def generate(server: ServerProcess, timeout: float = 120.0, **body) -> requests.Response:
    return requests.post(server.url + "/generate", json=body, timeout=timeout)


def stream_chunks(resp: requests.Response) -> tuple[list[dict], bool]:
    """The JSON chunks of an SSE answer, and whether it ended with data: [DONE]."""
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/event-stream")
    chunks, done = [], False
    for event in resp.text.split("\n\n"):
        if not event:
            continue
        assert event.startswith("data: "), event
        payload = event[len("data: "):]
        assert not done, "nothing may follow [DONE]"
        if payload == "[DONE]":
            done = True
        else:
            chunks.append(json.loads(payload))
    return chunks, done


def live_state(server: ServerProcess) -> dict:
    return ok(server.get("/get_server_info"))["internal_states"][0]


def wait_idle_clean(server: ServerProcess, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = live_state(server)
        if (state["idle_clean"] and state["num_engine_reqs"] == 0 and state["num_frontend_reqs"] == 0
                and state["cache_protected_tokens"] == 0):
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"server not idle and clean after {timeout} s: {state}")
        time.sleep(0.1)


def wait_running(server: ServerProcess, rid_count: int = 1, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while live_state(server)["num_running_reqs"] < rid_count:
        assert time.monotonic() < deadline, "request never started running"
        time.sleep(0.02)


# --- generation -------------------------------------------------------------------------------------


def test_generate_text_single(server, tokenizer):
    out = ok(generate(server, text=PROMPT, sampling_params={"max_new_tokens": 8, "temperature": 0, "ignore_eos": True},
                      rid="single-1"))
    assert set(out) == {"text", "output_ids", "meta_info"}
    meta = out["meta_info"]
    assert meta["id"] == "single-1"
    assert meta["finish_reason"] == {"type": "length", "length": 8}
    assert meta["prompt_tokens"] == len(tokenizer(PROMPT)["input_ids"])
    assert meta["completion_tokens"] == len(out["output_ids"]) == 8
    assert meta["weight_version"] == "default"
    assert meta["e2e_latency"] > 0 and isinstance(meta["cached_tokens"], int)
    assert out["text"] == tokenizer.decode(out["output_ids"], skip_special_tokens=True)
    assert "input_token_logprobs" not in meta
    # Greedy is reproducible, and the prompt is now cached.
    again = ok(generate(server, text=PROMPT, sampling_params={"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}))
    assert again["output_ids"] == out["output_ids"]
    assert again["meta_info"]["cached_tokens"] > 0


def test_generate_put_and_input_ids(server, tokenizer):
    ids = tokenizer(PROMPT)["input_ids"]
    resp = requests.put(server.url + "/generate", timeout=60,
                        json={"input_ids": ids, "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
    by_ids = ok(resp)
    by_text = ok(generate(server, text=PROMPT, sampling_params={"max_new_tokens": 4, "temperature": 0}))
    assert by_ids["output_ids"] == by_text["output_ids"]


def test_generate_batch_and_rids(server):
    out = ok(generate(server, text=["Hello there", "A second, longer prompt with more words", "x"],
                      sampling_params={"max_new_tokens": 3, "ignore_eos": True}, rid="batch"))
    assert isinstance(out, list) and len(out) == 3
    assert [o["meta_info"]["id"] for o in out] == ["batch_0", "batch_1", "batch_2"]
    assert all(o["meta_info"]["completion_tokens"] == 3 for o in out)
    # Per-prompt sampling params and rid list, token-id batch.
    out = ok(generate(server, input_ids=[[10, 11, 12], [13, 14]], rid=["r-a", "r-b"],
                      sampling_params=[{"max_new_tokens": 2, "ignore_eos": True},
                                       {"max_new_tokens": 5, "ignore_eos": True}]))
    assert [o["meta_info"]["id"] for o in out] == ["r-a", "r-b"]
    assert [o["meta_info"]["completion_tokens"] for o in out] == [2, 5]
    assert [o["meta_info"]["prompt_tokens"] for o in out] == [3, 2]


def test_n_samples_prompt_major_share_prefix(server):
    prompts = [PROMPT + "one", PROMPT.upper() + "two"]
    out = ok(generate(server, text=prompts, rid="nn", sampling_params={"max_new_tokens": 4, "n": 3, "ignore_eos": True,
                                                                        "temperature": 0}))
    assert len(out) == 6
    assert [o["meta_info"]["id"] for o in out] == [f"nn_{i}_{j}" for i in range(2) for j in range(3)]
    for i in range(2):
        group = out[3 * i:3 * i + 3]
        assert len({o["meta_info"]["prompt_tokens"] for o in group}) == 1
        assert all(o["output_ids"] == group[0]["output_ids"] for o in group)   # greedy siblings agree
        # The prompt is prefilled once: the siblings read it from the prefix cache.
        assert sum(o["meta_info"]["cached_tokens"] > 0 for o in group) >= 2, [o["meta_info"] for o in group]
    # A single prompt with n > 1 answers a list too.
    out = ok(generate(server, text=PROMPT + "three", sampling_params={"max_new_tokens": 2, "n": 2}))
    assert isinstance(out, list) and len(out) == 2


def test_logprobs_invariants(server, tokenizer):
    start = 5
    out = ok(generate(server, text=PROMPT, return_logprob=True, logprob_start_len=start, top_logprobs_num=3,
                      token_ids_logprob=[5, 100, 2000], return_text_in_logprobs=True,
                      sampling_params={"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}))
    meta = out["meta_info"]
    n_out = meta["completion_tokens"]
    assert len(meta["input_token_logprobs"]) + start == meta["prompt_tokens"]
    assert meta["input_token_logprobs"][0][0] is None
    assert all(isinstance(e[0], float) for e in meta["input_token_logprobs"][1:])
    assert len(meta["output_token_logprobs"]) == n_out == len(out["output_ids"])
    assert [e[1] for e in meta["output_token_logprobs"]] == out["output_ids"]
    assert len(meta["input_top_logprobs"]) == len(meta["input_token_logprobs"])
    assert meta["input_top_logprobs"][0] is None
    assert len(meta["output_top_logprobs"]) == n_out
    for top, chosen in zip(meta["output_top_logprobs"], meta["output_token_logprobs"]):
        assert len(top) == 3
        assert top[0] == chosen  # greedy: the chosen token is the most probable
    assert len(meta["output_token_ids_logprobs"]) == n_out
    assert all([e[1] for e in row] == [5, 100, 2000] for row in meta["output_token_ids_logprobs"])
    assert len(meta["input_token_ids_logprobs"]) == len(meta["input_token_logprobs"])
    for lp, tid, text in meta["output_token_logprobs"]:
        assert text == tokenizer.decode([tid]) and lp <= 0
    assert meta["output_token_weight_versions"] == ["default"] * n_out
    # Output-only logprobs (the default start) and no token texts unless asked.
    out = ok(generate(server, text=PROMPT, return_logprob=True, sampling_params={"max_new_tokens": 3}))
    meta = out["meta_info"]
    assert meta["input_token_logprobs"] == []
    assert len(meta["output_token_logprobs"]) == 3 and all(e[2] is None for e in meta["output_token_logprobs"])


def test_stream_cumulative_chunks(server):
    resp = generate(server, text=PROMPT, stream=True,
                    sampling_params={"max_new_tokens": 40, "temperature": 0, "ignore_eos": True})
    chunks, done = stream_chunks(resp)
    assert done and chunks
    for prev, cur in zip(chunks, chunks[1:]):   # cumulative: each chunk extends the previous one
        assert cur["output_ids"][:len(prev["output_ids"])] == prev["output_ids"]
        assert cur["text"].startswith(prev["text"][:max(len(prev["text"]) - 4, 0)])
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    last = chunks[-1]
    assert last["meta_info"]["finish_reason"] == {"type": "length", "length": 40}
    assert "index" not in last
    ref = ok(generate(server, text=PROMPT, sampling_params={"max_new_tokens": 40, "temperature": 0, "ignore_eos": True}))
    assert last["output_ids"] == ref["output_ids"] and last["text"] == ref["text"]


def test_stream_batch_and_n_carry_index(server):
    resp = generate(server, text=["first prompt", "second prompt here"], stream=True, return_logprob=True,
                    sampling_params={"max_new_tokens": 12, "n": 2, "ignore_eos": True})
    chunks, done = stream_chunks(resp)
    assert done
    assert {c["index"] for c in chunks} == {0, 1, 2, 3}
    finals = {}
    for c in chunks:
        assert len(c["meta_info"]["output_token_logprobs"]) == len(c["output_ids"])
        if c["meta_info"]["finish_reason"] is not None:
            finals[c["index"]] = c
    assert sorted(finals) == [0, 1, 2, 3]
    assert all(len(c["output_ids"]) == 12 for c in finals.values())


def test_stop_conditions(server, tokenizer):
    # A stop token id right after the first generated token.
    first = ok(generate(server, text=PROMPT, sampling_params={"max_new_tokens": 1, "temperature": 0}))["output_ids"][0]
    out = ok(generate(server, text=PROMPT, sampling_params={"max_new_tokens": 10, "temperature": 0,
                                                             "stop_token_ids": [first]}))
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": first}
    assert out["output_ids"] == [first]
    # max_new_tokens 0 answers at once.
    out = ok(generate(server, text=PROMPT, sampling_params={"max_new_tokens": 0}))
    assert out["output_ids"] == [] and out["meta_info"]["finish_reason"]["type"] == "length"


def test_duplicate_inflight_rid(server):
    body = {"text": PROMPT, "rid": "dup-rid", "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}}
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", generate(server, **body)))
    t.start()
    wait_running(server)
    dup = generate(server, **body)
    assert dup.status_code == 400 and "dup-rid" in dup.json()["error"]["message"]
    assert server.post("/abort_request", json={"rid": "dup-rid"}).status_code == 200
    t.join(60)
    out = ok(box["r"])
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert 0 < out["meta_info"]["completion_tokens"] < 3000
    assert len(out["output_ids"]) == out["meta_info"]["completion_tokens"]
    # The rid is free again once its request ended.
    ok(generate(server, text="again", rid="dup-rid", sampling_params={"max_new_tokens": 1}))


# --- abort and disconnect ---------------------------------------------------------------------------


def test_abort_request_partial_output(server):
    box = {}
    long = {"max_new_tokens": 3000, "ignore_eos": True}
    t1 = threading.Thread(target=lambda: box.setdefault("a", generate(server, text=PROMPT, rid="ab-1", sampling_params=long)))
    t2 = threading.Thread(target=lambda: box.setdefault("s", generate(server, text=PROMPT, rid="ab-2", stream=True,
                                                                       sampling_params=long)))
    t1.start(), t2.start()
    wait_running(server, 2)
    time.sleep(0.2)
    resp = server.post("/abort_request", json={"rid": "ab-"})   # a prefix aborts both
    assert resp.status_code == 200
    t1.join(60), t2.join(60)
    out = ok(box["a"])
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert isinstance(out["meta_info"]["finish_reason"]["message"], str)
    assert 0 < out["meta_info"]["completion_tokens"] == len(out["output_ids"]) < 3000
    chunks, done = stream_chunks(box["s"])
    assert done and chunks[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    wait_idle_clean(server)


def test_abort_all(server):
    with ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(generate, server, text=f"{PROMPT} {i}",
                            sampling_params={"max_new_tokens": 3000, "ignore_eos": True}) for i in range(4)]
        wait_running(server, 4)
        assert server.post("/abort_request", json={"abort_all": True}).status_code == 200
        outs = [ok(f.result(60)) for f in futs]
    assert all(o["meta_info"]["finish_reason"]["type"] == "abort" for o in outs)
    assert server.post("/abort_request", json={}).status_code == 200   # {} is a no-op
    wait_idle_clean(server)


def test_client_disconnect_aborts_in_engine(server):
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True}}
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(server.url + "/generate", json=body, timeout=(10, 0.5))
    # 4000 tokens take many seconds: the engine must drop the request much sooner than that.
    wait_idle_clean(server, timeout=5.0)
    # A streaming client that leaves after the first chunk.
    resp = requests.post(server.url + "/generate", json={**body, "stream": True}, stream=True, timeout=30)
    for line in resp.iter_lines():
        if line.startswith(b"data: "):
            break
    resp.close()
    wait_idle_clean(server, timeout=5.0)


# --- control routes ---------------------------------------------------------------------------------


def test_model_info_keys(server, model_dir):
    for path in ("/get_model_info", "/model_info"):
        info = ok(server.get(path))
        assert set(info) == MODEL_INFO_KEYS
        assert info["model_path"] == model_dir and info["is_generation"] is True
        assert info["model_type"] == "llama" and info["architectures"] == ["LlamaForCausalLM"]
        assert info["weight_version"] == "default"
        assert info["has_image_understanding"] is False and info["has_audio_understanding"] is False


def test_server_info(server, model_dir):
    for path in ("/get_server_info", "/server_info"):
        info = ok(server.get(path))
        for key in ("model_path", "tokenizer_path", "host", "port", "dtype", "device", "is_embedding",
                    "skip_tokenizer_init", "context_length", "max_running_requests", "max_total_tokens",
                    "chunked_prefill_size", "page_size", "disable_radix_cache", "mem_fraction_static",
                    "random_seed", "weight_version", "api_key", "log_level", "attention_backend",
                    "max_total_num_tokens", "max_req_input_len", "version", "internal_states"):
            assert key in info, key
        assert info["max_total_num_tokens"] == 120000 and info["max_req_input_len"] == CONTEXT - 1
        state = info["internal_states"][0]
        for key in ("num_running_reqs", "num_waiting_reqs", "kv_available_tokens", "cache_tokens", "idle_clean",
                    "token_usage"):
            assert key in state


def test_health(server):
    assert server.get("/health").status_code == 200
    assert server.get("/health_generate").status_code == 200


def test_flush_cache(server):
    ok(generate(server, text=PROMPT, sampling_params={"max_new_tokens": 2}))
    assert live_state(server)["cache_tokens"] > 0
    for method in ("GET", "POST"):
        resp = requests.request(method, server.url + "/flush_cache", timeout=30)
        assert resp.status_code == 200 and resp.text == FLUSH_OK_TEXT
    state = live_state(server)
    assert state["cache_tokens"] == 0 and state["kv_available_tokens"] == state["max_total_num_tokens"]
    # Busy: 400 at once; with a timeout that outlasts the request (aborted after 0.5 s here), 200.
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", generate(server, text=PROMPT, rid="flush-busy",
                                                                      sampling_params={"max_new_tokens": 4000,
                                                                                       "ignore_eos": True})))
    t.start()
    wait_running(server)
    busy = server.post("/flush_cache")
    assert busy.status_code == 400 and "error" in busy.json()
    aborter = threading.Timer(0.5, lambda: server.post("/abort_request", json={"rid": "flush-busy"}))
    aborter.start()
    started = time.monotonic()
    resp = server.post("/flush_cache", json={"timeout": 120})
    assert resp.status_code == 200, resp.text
    assert time.monotonic() - started >= 0.4   # it waited for the request to end
    t.join(60)
    aborter.join()
    assert ok(box["r"])["meta_info"]["finish_reason"]["type"] == "abort"
    assert server.get("/flush_cache", params={"timeout": "2"}).status_code == 200


def test_tokenize_detokenize(server, tokenizer):
    out = ok(server.post("/tokenize", json={"prompt": "Hello world"}))
    assert out["tokens"] == tokenizer("Hello world")["input_ids"]
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == CONTEXT
    out2 = ok(server.post("/tokenize", json={"prompt": ["a b", "c"], "add_special_tokens": False}))
    assert out2["count"] == [len(t) for t in out2["tokens"]]
    text = ok(server.post("/detokenize", json={"tokens": out["tokens"]}))["text"]
    assert text == "Hello world"
    texts = ok(server.post("/detokenize", json={"tokens": [out["tokens"], out["tokens"][:1]]}))["text"]
    assert texts == ["Hello world", "Hello"]
    special = tokenizer.eos_token_id
    assert ok(server.post("/detokenize", json={"tokens": [special], "skip_special_tokens": False}))["text"] != ""
    assert ok(server.post("/detokenize", json={"tokens": [special]}))["text"] == ""


# --- errors -----------------------------------------------------------------------------------------

V = 49152
BAD_GENERATE_BODIES = [
    ({}, "Either text, input_ids or input_embeds should be provided."),
    ({"text": "a", "input_ids": [1]}, "Either text, input_ids or input_embeds should be provided."),
    ({"input_ids": []}, "input_ids cannot be empty."),
    ({"input_ids": [[]]}, "input_ids cannot be empty."),
    ({"input_ids": [V]}, str(V)),
    ({"input_ids": [-1]}, "-1"),
    ({"input_ids": ["a", "b"]}, "input_ids"),
    ({"input_ids": [1.5]}, "input_ids"),
    ({"text": 5}, "text"),
    ({"text": []}, "text"),
    ({"text": "a", "sampling_params": {"max_new_tokenz": 3}}, "max_new_tokenz"),
    ({"text": "a", "sampling_params": {"temperature": -1}}, "temperature must be a non-negative finite number, got -1"),
    ({"text": "a", "sampling_params": {"temperature": "hot"}}, "hot"),
    ({"text": "a", "sampling_params": {"top_p": 0}}, "top_p must be in (0, 1], got 0"),
    ({"text": "a", "sampling_params": {"top_p": 1.5}}, "top_p must be in (0, 1], got 1.5"),
    ({"text": "a", "sampling_params": {"min_p": 2}}, "min_p must be in [0, 1], got 2"),
    ({"text": "a", "sampling_params": {"top_k": 0}}, "top_k must be -1 (disable) or at least 1, got 0"),
    ({"text": "a", "sampling_params": {"frequency_penalty": 3}}, "frequency_penalty must be in [-2, 2], got 3"),
    ({"text": "a", "sampling_params": {"presence_penalty": -3}}, "presence_penalty must be in [-2, 2], got -3"),
    ({"text": "a", "sampling_params": {"repetition_penalty": 0}}, "repetition_penalty must be in (0, 2]"),
    ({"text": "a", "sampling_params": {"max_new_tokens": 4, "min_new_tokens": 5}}, "min_new_tokens must be in"),
    ({"text": "a", "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens must be at least 0, got -1"),
    ({"text": "a", "sampling_params": {"max_new_tokens": 1.5}}, "max_new_tokens"),
    ({"text": "a", "sampling_params": {"n": 0}}, "n must be at least 1"),
    ({"text": "a", "sampling_params": {"n": 10**6}}, "sampling_params.n"),
    ({"text": "a", "sampling_params": {"stop": [""]}}, "stop"),
    ({"text": "a", "sampling_params": {"logit_bias": {str(V): 1.0}}}, "logit_bias"),
    ({"text": "a", "sampling_params": {"logit_bias": {"abc": 1.0}}}, "logit_bias"),
    ({"text": "a", "sampling_params": {"sampling_seed": 2**70}}, "sampling_seed"),
    ({"text": "a", "sampling_params": {"top_k": 10**30}}, "top_k"),
    ({"text": "a", "sampling_params": "greedy"}, "sampling_params"),
    ({"text": ["a", "b"], "sampling_params": [{}]}, "sampling_params is a list of 1"),
    ({"input_ids": list(range(100, 100 + CONTEXT))}, "context length"),
    ({"text": "a", "return_logprob": True, "logprob_start_len": -2}, "logprob_start_len"),
    ({"input_ids": [1, 2, 3], "return_logprob": True, "logprob_start_len": 3}, "logprob_start_len"),
    ({"text": "a", "top_logprobs_num": -1}, "top_logprobs_num"),
    ({"text": "a", "top_logprobs_num": V + 1}, "top_logprobs_num"),
    ({"text": "a", "token_ids_logprob": [V]}, "token_ids_logprob"),
    ({"text": "a", "token_ids_logprob": "5"}, "token_ids_logprob"),
    ({"text": "a", "stream": "yes"}, "stream must be a boolean"),
    ({"text": "a", "return_logprob": 1}, "return_logprob must be a boolean"),
    ({"text": "a", "rid": 5}, "rid"),
    ({"text": ["a", "b"], "rid": ["x"]}, "rid is a list of 1"),
    ({"text": ["a", "b"], "rid": ["x", "x"]}, "Duplicate request ID"),
    ({"text": "a", "return_logprobs": True}, "return_logprobs"),
    ({"text": "a", "image_data": "http://x/y.png"}, "image_data"),
    ({"text": "a", "input_embeds": [[0.1, 0.2]]}, "input_embeds"),
]


def test_bad_requests_are_400_and_server_keeps_working(server):
    seen = set()
    for body, expected in BAD_GENERATE_BODIES:
        key = json.dumps(body, sort_keys=True)
        assert key not in seen
        seen.add(key)
        resp = generate(server, **body)
        assert resp.status_code == 400, (body, resp.status_code, resp.text[:300])
        message = resp.json()["error"]["message"]
        assert expected in message, (body, message)
    raw_cases = [
        ("/generate", b"{not json"),
        ("/generate", b"[1, 2]"),
        ("/generate", b""),
        ("/generate", b'{"text": "a", "sampling_params": {"temperature": 1e400}}'),
        ("/tokenize", b"{}"),
        ("/tokenize", b'{"prompt": 5}'),
        ("/detokenize", b'{"tokens": [49152]}'),
        ("/detokenize", b'{"tokens": "abc"}'),
        ("/abort_request", b'{"rid": 5}'),
        ("/flush_cache", b'{"timeout": -1}'),
        ("/flush_cache", b'{"timeout": "soon"}'),
    ]
    for path, raw in raw_cases:
        resp = requests.post(server.url + path, data=raw, headers={"Content-Type": "application/json"}, timeout=30)
        assert resp.status_code == 400, (path, raw, resp.status_code, resp.text[:300])
        assert resp.json()["error"]["message"]
    assert len(BAD_GENERATE_BODIES) + len(raw_cases) >= 25
    # Unknown routes and methods keep their status, in the same error shape.
    resp = requests.get(server.url + "/no_such_route", timeout=30)
    assert resp.status_code == 404 and "error" in resp.json()
    assert requests.get(server.url + "/generate", timeout=30).status_code == 405
    # Defaults that SGLang clients send for features we lack are accepted.
    ok(generate(server, text="a", sampling_params={"max_new_tokens": 1}, image_data=None, lora_path=None,
                return_hidden_states=False, log_metrics=True, custom_logit_processor=None))
    # And the server still generates.
    out = ok(generate(server, text=PROMPT, sampling_params={"max_new_tokens": 4, "ignore_eos": True}))
    assert out["meta_info"]["completion_tokens"] == 4
    wait_idle_clean(server)


# --- load -------------------------------------------------------------------------------------------


def test_200_concurrent_with_aborts_and_disconnects(server, tokenizer):
    rng = random.Random(1234)
    words = PROMPT.split()
    plans = []
    for i in range(200):
        kind = rng.choices(["plain", "stream", "logprob", "abort", "disconnect", "stream_disconnect"],
                           weights=[45, 12, 8, 13, 11, 11])[0]
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(3, 60))) + f" #{i}"
        n_new = rng.randint(1, 40) if kind in ("plain", "stream", "logprob") else 3000
        plans.append((i, kind, prompt, n_new, rng.random()))

    def run(plan):
        i, kind, prompt, n_new, u = plan
        rid = f"load-{i:03d}"  # fixed width: no rid is a prefix of another (abort matches prefixes)
        body = {"text": prompt, "rid": rid, "sampling_params": {"max_new_tokens": n_new, "ignore_eos": True,
                                                                  "temperature": 0.8, "sampling_seed": i}}
        if kind == "logprob":
            body.update(return_logprob=True, top_logprobs_num=2, logprob_start_len=0)
        if kind == "abort":
            aborter = threading.Timer(0.1 + u, lambda: requests.post(server.url + "/abort_request",
                                                                     json={"rid": rid}, timeout=60))
            aborter.start()
            out = ok(generate(server, **body))
            aborter.join()
            assert out["meta_info"]["finish_reason"]["type"] == "abort"
            assert len(out["output_ids"]) == out["meta_info"]["completion_tokens"] < n_new
            return kind
        if kind == "disconnect":
            try:
                requests.post(server.url + "/generate", json=body, timeout=(30, 0.1 + u))
            except requests.exceptions.ReadTimeout:
                return kind
            raise AssertionError("a 3000-token request cannot have finished")
        if kind == "stream_disconnect":
            resp = requests.post(server.url + "/generate", json={**body, "stream": True}, stream=True, timeout=60)
            seen = 0
            for line in resp.iter_lines():
                if line.startswith(b"data: "):
                    seen += 1
                    if seen >= 1 + int(u * 3):
                        break
            resp.close()
            return kind
        if kind == "stream":
            chunks, done = stream_chunks(generate(server, stream=True, **body))
            assert done
            out = chunks[-1]
        else:
            out = ok(generate(server, **body))
        meta = out["meta_info"]
        assert meta["id"] == rid
        assert meta["finish_reason"] == {"type": "length", "length": n_new}
        assert meta["completion_tokens"] == len(out["output_ids"]) == n_new
        assert meta["prompt_tokens"] == len(tokenizer(prompt)["input_ids"])
        assert out["text"] == tokenizer.decode(out["output_ids"], skip_special_tokens=True)
        if kind == "logprob":
            assert len(meta["input_token_logprobs"]) == meta["prompt_tokens"]
            assert len(meta["output_token_logprobs"]) == n_new == len(meta["output_top_logprobs"])
        return kind

    probes = threading.Event()

    def probe():  # control routes keep answering under load
        while not probes.is_set():
            assert server.get("/health", timeout=60).status_code == 200
            live_state(server)
            time.sleep(0.2)

    prober = ThreadPoolExecutor(1)
    probe_future = prober.submit(probe)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=200) as pool:
        kinds = list(pool.map(run, plans))
    probes.set()
    probe_future.result(60)
    prober.shutdown()
    assert len(kinds) == 200
    state = wait_idle_clean(server, timeout=60)
    assert state["kv_available_tokens"] + state["cache_tokens"] == state["max_total_num_tokens"]
    assert state["req_pool_available"] == state["req_pool_size"]
    # Still serving, and the cache can be dropped (nothing holds it).
    assert server.post("/flush_cache").status_code == 200
    state = live_state(server)
    assert state["kv_available_tokens"] == state["max_total_num_tokens"]
    print(f"200 requests in {time.monotonic() - started:.1f} s")
