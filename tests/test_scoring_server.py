"""The Scoring routes end to end (`python -m rollout.launch_server` in a subprocess): a tiny reward model
served with --is-embedding (/classify, /encode, health), a tiny generation model (/v1/score), and a tiny
BERT cross-encoder (/v1/rerank); answers equal transformers' on the same weights; bad bodies and routes
on the wrong kind of server are 400s naming the field, and the server keeps serving after each. The reward
and generation servers are tests/conftest.py's scoring_* fixtures (shared with test_client_scoring).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from tests.helpers import ServerProcess
from tests.scoring_models import make_tiny_cross_encoder_dir
from tests.server_checks import bad, cpu_server, ok

CHATS = ["<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
         "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n5, I think.<|im_end|>",
         "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nBlue<|im_end|>"]


def still_serves(server: ServerProcess, route: str, body: dict) -> None:
    ok(server.post(route, json=body))


def test_classify_matches_transformers(scoring_rm_server, scoring_rm_dir):
    ref = AutoModelForSequenceClassification.from_pretrained(scoring_rm_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(scoring_rm_dir)
    outs = ok(scoring_rm_server.post("/classify", json={"text": CHATS}))
    assert isinstance(outs, list) and len(outs) == len(CHATS)
    for text, out in zip(CHATS, outs):
        ids = tok(text)["input_ids"]
        assert out["embedding"][0] == pytest.approx(ref(torch.tensor([ids])).logits[0, 0].item(), abs=1e-4)
        assert out["meta_info"]["prompt_tokens"] == len(ids)
        assert out["meta_info"]["weight_version"] == "default"
    # /encode is the same handler; token ids give the same reward as their text.
    single = ok(scoring_rm_server.post("/encode", json={"input_ids": tok(CHATS[1])["input_ids"], "rid": "rm-1"}))
    assert single["meta_info"]["id"] == "rm-1"
    assert single["embedding"][0] == pytest.approx(outs[1]["embedding"][0], abs=1e-5)
    info = ok(scoring_rm_server.get("/get_model_info"))
    assert info["is_generation"] is False and info["architectures"] == ["LlamaForSequenceClassification"]
    assert scoring_rm_server.get("/health_generate").status_code == 200


@pytest.mark.parametrize("body, fragments", [
    ({}, ["Either text or input_ids"]),
    ({"text": []}, ["text cannot be an empty list"]),
    ({"text": ["ok", 3]}, ["text must be a string", "3"]),
    ({"input_ids": [1, 2, 49152]}, ["token id 49152", "outside the vocabulary"]),
    ({"input_ids": [[1, 2], []]}, ["input_ids cannot be empty"]),
    ({"input_ids": [1] * 600}, ["longer than the model's context"]),
    ({"text": "hi", "temperature": 1}, ["Unknown field", "temperature"]),
])
def test_classify_bad_bodies(scoring_rm_server, body, fragments):
    bad(scoring_rm_server.post("/classify", json=body), *fragments)
    still_serves(scoring_rm_server, "/classify", {"text": "still here"})


def test_wrong_routes_on_scoring_server(scoring_rm_server):
    bad(scoring_rm_server.post("/generate", json={"text": "hi"}), "needs a generation model", "--is-embedding")
    bad(scoring_rm_server.post("/v1/score", json={"query": "a", "items": ["b"], "label_token_ids": [1]}),
        "needs a generation model")
    bad(scoring_rm_server.post("/v1/rerank", json={"query": "a", "documents": ["b"]}), "needs a cross-encoder",
        "LlamaForSequenceClassification")
    still_serves(scoring_rm_server, "/encode", {"text": "still here"})


def test_score_matches_transformers(scoring_lm_server, scoring_lm_dir):
    lm = AutoModelForCausalLM.from_pretrained(scoring_lm_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(scoring_lm_dir)
    labels = [tok.encode(" yes")[0], tok.encode(" no")[0]]
    query = "Answer yes or no. Is this sentence about animals? " * 3
    items = [" Cats purr.", " The stock market fell.", " Dogs bark loudly at night."]
    out = ok(scoring_lm_server.post("/v1/score", json={"query": query, "items": items, "label_token_ids": labels,
                                               "apply_softmax": True, "model": "m"}))
    assert out["object"] == "scoring" and out["model"] == "m" and out["usage"]["prompt_tokens"] > 0
    raw = ok(scoring_lm_server.post("/v1/score", json={"query": query, "items": items, "label_token_ids": labels}))
    for i, item in enumerate(items):
        logits = lm(torch.tensor([tok(query + item)["input_ids"]])).logits[0, -1]
        assert out["scores"][i] == pytest.approx(torch.softmax(logits[labels], -1).tolist(), abs=1e-5)
        probs = torch.softmax(logits, -1)[labels]
        assert raw["scores"][i] == pytest.approx(probs.tolist(), rel=1e-4, abs=1e-7)
    # The query's KV was cached by the first call: all items found it.
    state = ok(scoring_lm_server.get("/get_server_info"))["internal_states"][0]
    assert state["cache_tokens"] > 0 and state["idle_clean"]


@pytest.mark.parametrize("body, fragments", [
    ({"query": "q", "items": ["a"], "label_token_ids": [49152]}, ["label_token_ids", "49152", "outside"]),
    ({"query": "q", "items": ["a"], "label_token_ids": [-1]}, ["label_token_ids", "-1"]),
    ({"query": "q", "items": [], "label_token_ids": [1]}, ["items cannot be empty"]),
    ({"query": "q", "items": "", "label_token_ids": [1]}, ["items cannot be empty"]),
    ({"query": "q", "items": ["a", ""], "label_token_ids": [1]}, ["items cannot contain an empty"]),
    ({"query": "q", "items": ["a"]}, ["label_token_ids is required"]),
    ({"query": "q", "items": ["a"], "label_token_ids": [1], "apply_softmax": "yes"}, ["apply_softmax", "'yes'"]),
    ({"query": [1, 2], "items": ["a"], "label_token_ids": [1]}, ["items must be a list of token-id lists"]),
    ({"query": 5, "items": ["a"], "label_token_ids": [1]}, ["query must be", "5"]),
])
def test_score_bad_bodies(scoring_lm_server, body, fragments):
    bad(scoring_lm_server.post("/v1/score", json=body), *fragments)
    still_serves(scoring_lm_server, "/v1/score", {"query": [5, 6], "items": [[7], [8, 9]], "label_token_ids": [3, 4]})


def test_wrong_routes_on_generation_server(scoring_lm_server):
    for route in ("/classify", "/encode"):
        bad(scoring_lm_server.post(route, json={"text": "hi"}), "needs a scoring model", "--is-embedding")
    bad(scoring_lm_server.post("/v1/rerank", json={"query": "a", "documents": ["b"]}), "needs a cross-encoder")
    ok(scoring_lm_server.post("/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}}))


def test_rerank_matches_transformers(tmp_path):
    path = make_tiny_cross_encoder_dir(tmp_path / "ce")
    ref = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    query = "how do plants make food"
    docs = ["Plants use photosynthesis.", "Cars need fuel.", "Leaves capture sunlight to make sugar.",
            "The moon orbits the earth."]
    want = ref(**tok([query] * len(docs), docs, padding=True, return_tensors="pt")).logits[:, 0].tolist()
    with cpu_server(path, "--max-total-tokens", "8192", "--is-embedding") as proc:
        got = ok(proc.post("/v1/rerank", json={"query": query, "documents": docs}))
        assert [r["index"] for r in got] == sorted(range(len(docs)), key=lambda i: -want[i])
        for r in got:
            assert r["score"] == pytest.approx(want[r["index"]], abs=1e-4) and r["document"] == docs[r["index"]]
        top = ok(proc.post("/v1/rerank", json={"query": query, "documents": docs, "top_n": 1,
                                               "return_documents": False}))
        assert top == [{"score": got[0]["score"], "index": got[0]["index"]}]
        bad(proc.post("/v1/rerank", json={"query": query, "documents": docs, "top_n": 0}), "top_n", "0")
        bad(proc.post("/v1/rerank", json={"query": query, "documents": []}), "documents", "[]")
        bad(proc.post("/v1/rerank", json={"query": query, "documents": docs, "extra": 1}), "Unknown field", "extra")
        emb = ok(proc.post("/encode", json={"text": "plants"}))  # a cross-encoder's /encode: its raw logit
        assert len(emb["embedding"]) == 1
        assert ok(proc.get("/get_server_info"))["internal_states"][0]["idle_clean"]
        assert proc.get("/health_generate").status_code == 200
