"""SGLang's clients and routers against a real server (tiny random Llama, SmolLM2's tokenizer, CPU):
every field of SGLang's GenerateReqInput / SamplingParams is accepted (honoured, ignored, or refused
only when really used), out-of-vocabulary stop token ids, "Duplicate request ID", /get_weight_version,
/update_weight_version's `new_version`, /get_load and /v1/loads, /v1/tokenize with the chat template,
--chunked-prefill-size -1 and --incremental-streaming-output. After every bad request the server still
serves.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from transformers import AutoTokenizer

from runtime import server_args as server_args_module
from runtime.messages import GenerateRequest
from runtime.model_runner import ModelRunner
from runtime.sampling_params import SamplingParams
from runtime.scheduler import Scheduler
from runtime.server_args import ServerArgs
from tests.helpers import ServerProcess, make_tiny_model_dir
from tests.server_checks import bad, cpu_server, ok

GREEDY = {"temperature": 0.0, "max_new_tokens": 8, "ignore_eos": True}
PROMPT = "The capital city of France is"
# What sglang-router 0.3.x and SGLang clients add to every /generate body, at their defaults.
ROUTER_DEFAULTS = {"model": None, "return_text_in_logprobs": False, "log_metrics": True, "return_entropy": False,
                   "background": False, "no_logs": False, "return_bytes": False, "return_sampling_mask": False,
                   "return_hidden_states": False, "return_routed_experts": False, "routed_experts_start_len": 0,
                   "custom_logit_processor": None, "lora_path": None, "session_params": None, "priority": None,
                   "data_parallel_rank": None, "bootstrap_host": None, "image_data": None, "stream": False,
                   "return_prompt_token_ids": False, "cache_salt": None, "require_reasoning": False}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama-compat"), context_length=2048)


@pytest.fixture(scope="module")
def server(model_dir: str, tmp_path_factory: pytest.TempPathFactory):
    log = str(tmp_path_factory.mktemp("compat-log") / "server.log")
    with cpu_server(model_dir, "--max-total-tokens", "20000", "--chunked-prefill-size", "-1",
                    "--incremental-streaming-output", log_path=log) as proc:
        yield proc


def still_serves(server: ServerProcess) -> None:
    out = ok(server.post("/generate", json={"text": PROMPT, "sampling_params": {**GREEDY, "max_new_tokens": 2}}))
    assert len(out["output_ids"]) == 2


def test_router_defaults_are_accepted_and_change_nothing(server):
    plain = ok(server.post("/generate", json={"text": PROMPT, "sampling_params": GREEDY}))
    with_defaults = ok(server.post("/generate", json={"text": PROMPT, "sampling_params": GREEDY, **ROUTER_DEFAULTS}))
    assert with_defaults["output_ids"] == plain["output_ids"] and with_defaults["text"] == plain["text"]
    # model as a string, the ignored routing hints, and SGLang's ignored sampling parameter.
    named = ok(server.post("/generate", json={"text": PROMPT, "model": "whatever", "routing_key": "k",
                                              "extra_key": "e", "sampling_params": {**GREEDY, "stream_interval": 4,
                                                                                    "stop_regex": None}}))
    assert named["output_ids"] == plain["output_ids"]


@pytest.mark.parametrize("body,words", [
    ({"custom_logit_processor": "gASV..."}, ["custom_logit_processor", "run code on the server"]),
    ({"return_entropy": True}, ["return_entropy", "not supported"]),
    ({"lora_path": "/adapters/a"}, ["lora_path"]),
    ({"return_routed_experts": True}, ["return_routed_experts"]),  # this server is dense
    ({"sampling_params": {"stop_regex": "a+b"}}, ["sampling_params.stop_regex", "not supported"]),
    ({"sampling_params": {"custom_params": {"k": 1}}}, ["sampling_params.custom_params"]),
    ({"return_logprobs": True}, ["Unknown field", "return_logprobs"]),
    ({"sampling_params": {"temprature": 0.5}}, ["Unknown sampling parameter", "temprature"]),
])
def test_fields_we_cannot_honour_are_a_clear_400(server, body, words):
    bad(server.post("/generate", json={"text": PROMPT, **body}), *words)
    still_serves(server)


def test_stop_token_ids_outside_the_vocabulary_never_match(server):
    vocab = ok(server.get("/get_server_info"))["vocab_size"]
    plain = ok(server.post("/generate", json={"text": PROMPT, "sampling_params": GREEDY}))
    out = ok(server.post("/generate", json={"text": PROMPT, "sampling_params": {
        **GREEDY, "stop_token_ids": [vocab, vocab + 1000, 2**40], "min_new_tokens": 2}}))
    assert out["output_ids"] == plain["output_ids"]
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    still_serves(server)


def test_duplicate_rid_says_request_id(server):
    bad(server.post("/generate", json={"text": [PROMPT, PROMPT], "rid": ["x", "x"]}), "Duplicate request ID")
    still_serves(server)


def test_weight_version_routes(server):
    for path in ("/get_weight_version", "/weight_version"):
        assert ok(server.get(path)) == {"weight_version": "default"}
    answer = ok(server.post("/update_weight_version", json={"new_version": "step-7"}))
    assert answer["success"] is True and answer["new_version"] == "step-7" and answer["message"]
    assert ok(server.get("/get_weight_version")) == {"weight_version": "step-7"}
    out = ok(server.post("/generate", json={"text": PROMPT, "sampling_params": {**GREEDY, "max_new_tokens": 1}}))
    assert out["meta_info"]["weight_version"] == "step-7"
    bad(server.post("/update_weight_version", json={"new_version": 5}), "new_version")
    ok(server.post("/update_weight_version", json={"new_version": "default"}))
    still_serves(server)


def test_get_load_and_v1_loads(server):
    load = ok(server.get("/get_load"))
    assert isinstance(load, list) and len(load) == 1
    assert {"dp_rank", "num_reqs", "num_waiting_reqs", "num_tokens"} <= set(load[0])
    assert load[0]["dp_rank"] == 0 and load[0]["num_reqs"] == 0 and load[0]["num_tokens"] == 0
    # While generation is paused a new request waits in the scheduler's queue: the load counts it and
    # its prompt's tokens.
    ok(server.post("/pause_generation", json={"mode": "in_place"}))
    prompt_ids = ok(server.post("/tokenize", json={"prompt": PROMPT}))["tokens"]
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(server.post, "/generate", json={"text": PROMPT, "sampling_params": GREEDY})
        deadline = time.monotonic() + 30
        while (busy := ok(server.get("/get_load"))[0])["num_reqs"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert busy["num_reqs"] == 1 and busy["num_waiting_reqs"] == 1 and busy["num_tokens"] == len(prompt_ids)
        queued = ok(server.get("/v1/loads"))["loads"][0]
        assert queued["num_waiting_reqs"] == 1 and queued["queues"]["paused"] == 1
        ok(server.post("/continue_generation", json={}))
        assert len(ok(pending.result(timeout=60))["output_ids"]) == GREEDY["max_new_tokens"]
    loads = ok(server.get("/v1/loads"))
    assert {"timestamp", "version", "dp_rank_count", "loads", "aggregate"} <= set(loads)
    entry = loads["loads"][0]
    assert entry["dp_rank"] == 0 and entry["max_total_num_tokens"] == 20000 and "queues" in entry
    assert entry["num_total_reqs"] == entry["num_running_reqs"] + entry["num_waiting_reqs"]
    assert "queues" not in ok(server.get("/v1/loads", params={"include": "core"}))["loads"][0]
    assert ok(server.get("/v1/loads", params={"dp_rank": 3}))["loads"] == []
    text = server.get("/v1/loads", params={"format": "prometheus"}).text
    assert 'sglang_max_total_num_tokens{dp_rank="0"} 20000' in text
    bad(server.get("/v1/loads", params={"include": "bogus"}), "bogus")
    bad(server.get("/v1/loads", params={"format": "xml"}), "format")
    still_serves(server)


def test_v1_tokenize_chat_and_prompt(server, model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    expected = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"]
    got = ok(server.post("/v1/tokenize", json={"model": "m", "messages": messages}))
    assert got["tokens"] == expected and got["count"] == len(expected) and got["max_model_len"] == 2048
    no_prompt = ok(server.post("/v1/tokenize", json={"messages": messages, "add_generation_prompt": False}))
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert no_prompt["tokens"] == tok(rendered, add_special_tokens=False)["input_ids"]
    assert len(no_prompt["tokens"]) < len(expected)
    text = ok(server.post("/v1/tokenize", json={"prompt": "hello world", "return_token_strs": True}))
    assert text["tokens"] == tok("hello world")["input_ids"]
    assert text["token_strs"] == tok.convert_ids_to_tokens(text["tokens"])
    batch = ok(server.post("/v1/tokenize", json={"prompt": ["a b", "c"]}))
    assert batch["count"] == [len(t) for t in batch["tokens"]]
    assert ok(server.post("/v1/detokenize", json={"tokens": expected}))["text"] == tok.decode(expected,
                                                                                              skip_special_tokens=True)
    for body, word in [({"messages": []}, "messages"), ({"messages": [{"content": "x"}]}, "role"),
                       ({"prompt": "a", "messages": messages}, "exactly one"), ({"prompt": 5}, "prompt"),
                       ({"messages": messages, "bogus": 1}, "bogus")]:
        resp = server.post("/v1/tokenize", json=body)
        assert resp.status_code == 400, (body, resp.text)
        error = resp.json()["error"]
        assert word in error["message"] and error["type"] == "invalid_request_error" and error["code"] == 400
    resp = server.post("/v1/detokenize", json={"tokens": [10**9]})
    assert resp.status_code == 400 and "outside the vocabulary" in resp.json()["error"]["message"]
    still_serves(server)


def test_incremental_streaming_chunks_carry_only_new_tokens(server):
    sp = {**GREEDY, "max_new_tokens": 24}
    full = ok(server.post("/generate", json={"text": PROMPT, "sampling_params": sp, "return_logprob": True}))
    resp = server.post("/generate", json={"text": PROMPT, "sampling_params": sp, "stream": True,
                                          "return_logprob": True})
    chunks = [json.loads(e[len("data: "):]) for e in resp.text.split("\n\n") if e and e != "data: [DONE]"]
    assert len(chunks) >= 2
    ids = [t for c in chunks for t in c["output_ids"]]
    assert ids == full["output_ids"]
    assert "".join(c["text"] for c in chunks) == full["text"]
    logprobs = [e for c in chunks for e in c["meta_info"]["output_token_logprobs"]]
    assert [e[1] for e in logprobs] == full["output_ids"]
    assert chunks[-1]["meta_info"]["completion_tokens"] == 24  # counts stay cumulative


def test_no_chunking_prefills_a_prompt_whole_and_matches_chunked(tiny_model_dir, monkeypatch):
    path = tiny_model_dir("llama", max_position_embeddings=1024)
    prompts = {"long": [(7 * i) % 250 + 3 for i in range(300)], "short": [(5 * i) % 250 + 3 for i in range(40)]}

    def run(chunked_prefill_size: int) -> tuple[Scheduler, dict[str, list[int]]]:
        args = ServerArgs(model_path=path, max_total_tokens=2048, chunked_prefill_size=chunked_prefill_size,
                          device="cpu", dtype="float32")
        sched = Scheduler(ModelRunner(args, progress=False), eos_token_ids=set())
        for rid, ids in prompts.items():
            sched.add_request(GenerateRequest(rid=rid, input_ids=ids, sampling_params=SamplingParams(
                temperature=0.0, max_new_tokens=4)))
        return sched, {}

    def finish(sched: Scheduler, outputs: dict[str, list[int]]) -> dict[str, list[int]]:
        while sched.has_work():
            for out in sched.step():
                outputs.setdefault(out.rid, []).extend(out.new_token_ids)
        return outputs

    chunked, out_chunked = run(16)
    finish(chunked, out_chunked)
    # Under the step budget every prompt is prefilled whole in the first step.
    whole, out_whole = run(-1)
    for out in whole.step():
        out_whole.setdefault(out.rid, []).extend(out.new_token_ids)
    assert sorted(r.rid for r in whole.running) == ["long", "short"]
    assert all(r.num_uncomputed == 1 for r in whole.running)
    assert finish(whole, out_whole) == out_chunked
    # Over the budget a prompt is still not chunked: it runs alone in its step.
    monkeypatch.setattr(server_args_module, "NO_CHUNK_STEP_TOKENS", 100)
    alone, out_alone = run(-1)
    alone.step()
    assert [r.rid for r in alone.running] == ["long"] and alone.running[0].num_uncomputed == 1
    assert finish(alone, out_alone) == out_chunked


def test_chunked_prefill_size_validation():
    with pytest.raises(ValueError, match="or -1"):
        ServerArgs(chunked_prefill_size=0, device="cpu")
    assert not ServerArgs(chunked_prefill_size=-1, device="cpu").chunked_prefill


def test_metrics_need_enable_metrics(server):
    resp = server.get("/metrics")
    assert resp.status_code == 404 and "--enable-metrics" in resp.json()["error"]["message"]
    still_serves(server)
