"""Weight updates and generation control on bidirectional-encoder servers (runtime/encoder_scheduler.py): a
BERT sentence-embedding server (/encode) and a BERT cross-encoder (/v1/rerank) switch checkpoints from disk
and answer as transformers does on the new one, with its version; pause / continue, get_weights_by_name,
and a wrong-shape checkpoint refused (400, rollback message) while the old weights keep serving.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import requests
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertModel

from tests.helpers import ServerProcess
from tests.server_checks import ok
from tests.scoring_models import make_tiny_cross_encoder_dir

pytestmark = pytest.mark.timeout(180)

SEQS = [list(range(5, 45)), [30, 31, 32], [7] * 20]
QUERY = "how do plants make food"
DOCS = ["Plants use photosynthesis.", "Cars need fuel.", "Leaves capture sunlight to make sugar."]


def make_bert(path: Path, seed: int) -> str:
    config = BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    model = BertModel(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # far from transformers' tiny init, so two seeds give clearly different embeddings
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(1.0 + noise if name.endswith("LayerNorm.weight") else noise)
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("encoders")
    return {"bert_a": make_bert(tmp / "bert-a", 0), "bert_b": make_bert(tmp / "bert-b", 1),
            "ce_a": make_tiny_cross_encoder_dir(tmp / "ce-a", seed=0),
            "ce_b": make_tiny_cross_encoder_dir(tmp / "ce-b", seed=1),
            "ce_wide": make_tiny_cross_encoder_dir(tmp / "ce-wide", hidden_size=48)}


@pytest.fixture(scope="module")
def servers(paths):
    procs = {"bert": ServerProcess(["--device", "cpu", "--dtype", "float32",
                                    "--model-path", paths["bert_a"], "--skip-tokenizer-init"]),
             "ce": ServerProcess(["--device", "cpu", "--dtype", "float32", "--model-path", paths["ce_a"]])}
    for p in procs.values():  # both load at once
        p.args += ["--is-embedding", "--log-level", "warning", "--weight-version", "a"]
        p.spawn()
    for p in procs.values():
        p.wait_ready(300)
    yield procs
    for p in procs.values():
        assert p.stop() == 0, p.log()


def update(server: ServerProcess, path: str, version: str) -> requests.Response:
    return server.post("/update_weights_from_disk", json={"model_path": path, "weight_version": version})


def encode(server: ServerProcess, version: str) -> torch.Tensor:
    outs = ok(server.post("/encode", json={"input_ids": SEQS}))
    assert [o["meta_info"]["weight_version"] for o in outs] == [version] * len(SEQS)
    return torch.tensor([o["embedding"] for o in outs])


def bert_reference(path: str) -> torch.Tensor:
    model = BertModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.stack([F.normalize(model(torch.tensor([s])).last_hidden_state.mean(1)[0], dim=-1)
                            for s in SEQS])


def rerank_scores(server: ServerProcess) -> list[float]:
    got = ok(server.post("/v1/rerank", json={"query": QUERY, "documents": DOCS}))
    return [r["score"] for r in sorted(got, key=lambda r: r["index"])]


def cross_encoder_reference(path: str, texts: list[str] | None = None) -> list[float]:
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(texts, padding=True, return_tensors="pt") if texts else \
        tok([QUERY] * len(DOCS), DOCS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits[:, 0].tolist()


def test_bert_encode_follows_disk_updates(servers, paths):
    s = servers["bert"]
    old = encode(s, "a")
    torch.testing.assert_close(old, bert_reference(paths["bert_a"]), atol=1e-4, rtol=0)
    want_b = bert_reference(paths["bert_b"])
    assert (old - want_b).abs().max() > 1e-2
    assert ok(update(s, paths["bert_b"], "b")) == {"success": True, "message": "Succeeded to update model weights."}
    torch.testing.assert_close(encode(s, "b"), want_b, atol=1e-4, rtol=0)
    assert ok(s.get("/get_model_info"))["weight_version"] == "b"
    assert ok(update(s, paths["bert_a"], "a2"))["success"]
    assert torch.equal(encode(s, "a2"), old)  # no cache, same batch: bitwise the old embeddings
    state = ok(s.get("/get_server_info"))["internal_states"][0]
    assert state["num_weight_updates"] == 2 and state["weight_version"] == "a2" and state["idle_clean"]


def test_cross_encoder_rerank_follows_disk_updates(servers, paths):
    s = servers["ce"]
    old = rerank_scores(s)
    assert old == pytest.approx(cross_encoder_reference(paths["ce_a"]), abs=1e-4)
    assert ok(update(s, paths["ce_b"], "b"))["success"]
    assert rerank_scores(s) == pytest.approx(cross_encoder_reference(paths["ce_b"]), abs=1e-4)
    assert ok(s.post("/encode", json={"text": "plants"}))["meta_info"]["weight_version"] == "b"
    assert ok(update(s, paths["ce_a"], "a"))["success"]
    assert rerank_scores(s) == old


def test_get_weights_pause_and_refused_update(servers, paths):
    s = servers["ce"]
    assert ok(update(s, paths["ce_a"], "a"))["success"]
    name = "classifier.weight"
    got = ok(s.post("/get_weights_by_name", json={"name": name, "truncate_size": 1}))
    ref_b = AutoModelForSequenceClassification.from_pretrained(paths["ce_b"], dtype=torch.float32).state_dict()
    ref_a = AutoModelForSequenceClassification.from_pretrained(paths["ce_a"], dtype=torch.float32).state_dict()
    assert torch.equal(torch.tensor(got), ref_a[name][:1])
    r = s.post("/get_weights_by_name", json={"name": "nope.weight"})
    assert r.status_code == 400 and "Unknown weight nope.weight" in r.json()["error"]["message"]

    # Paused in place: a request waits; an update while paused applies; after continue the request
    # runs on the new weights and says so.
    assert ok(s.post("/pause_generation", json={"mode": "in_place"}))["success"]
    assert ok(s.get("/get_server_info"))["internal_states"][0]["paused"] == "in_place"
    results: list[requests.Response] = []
    t = threading.Thread(target=lambda: results.append(s.post("/encode", json={"text": "plants"})))
    t.start()
    time.sleep(0.5)
    assert not results
    assert ok(update(s, paths["ce_b"], "p1"))["success"]
    assert torch.equal(torch.tensor(ok(s.get("/get_weights_by_name", params={"name": name, "truncate_size": 1}))),
                       ref_b[name][:1])
    assert ok(s.post("/continue_generation", json={}))["success"]
    t.join(30)
    out = ok(results[0])
    assert out["meta_info"]["weight_version"] == "p1"
    assert out["embedding"][0] == pytest.approx(cross_encoder_reference(paths["ce_b"], ["plants"])[0], abs=1e-4)

    before = rerank_scores(s)
    r = update(s, paths["ce_wide"], "never")
    assert r.status_code == 400, r.text
    message = r.json()["message"]
    assert message.startswith("Failed to update weights: Shape mismatch for bert."), message
    assert message.endswith(".\nRolling back to original weights."), message
    assert rerank_scores(s) == before
    assert ok(s.post("/encode", json={"text": "plants"}))["meta_info"]["weight_version"] == "p1"
    assert ok(s.get("/get_model_info"))["model_path"] == paths["ce_b"]
