"""Hot weight updates on a reward-model server (LlamaForSequenceClassification, `--is-embedding`, the decoder
scheduler): /classify answers as the checkpoint last loaded from disk, with its weight_version, and never
from KV cached under older weights (the chats share a prefix, which the first call leaves in the cache).
"""

from __future__ import annotations

import pytest
import requests
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.helpers import ServerProcess, make_tiny_model_dir
from tests.scoring_models import make_reward_model_dir

pytestmark = pytest.mark.timeout(180)

CHATS = ["<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
         "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n5, I think.<|im_end|>",
         "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nBlue<|im_end|>"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("rm")
    lm_a = make_tiny_model_dir(tmp / "lm-a", context_length=512, seed=0)
    lm_b = make_tiny_model_dir(tmp / "lm-b", context_length=512, seed=1)
    return {"a": make_reward_model_dir(tmp / "rm-a", lm_a, head_std=0.3, seed=0),
            "b": make_reward_model_dir(tmp / "rm-b", lm_b, head_std=0.3, seed=1),
            # Two labels: score.weight is [2, hidden], so the checkpoint cannot go into this model.
            "wrong": make_reward_model_dir(tmp / "rm-2", lm_a, head_std=0.3, num_labels=2)}


@pytest.fixture(scope="module")
def server(paths):
    proc = ServerProcess(["--device", "cpu", "--dtype", "float32",
                          "--model-path", paths["a"], "--is-embedding", "--max-total-tokens", "8192",
                          "--log-level", "warning", "--weight-version", "a"]).start(timeout=300)
    yield proc
    assert proc.stop() == 0, proc.log()


def classify(server: ServerProcess, version: str) -> list[float]:
    r = server.post("/classify", json={"text": CHATS})
    assert r.status_code == 200, r.text
    assert [o["meta_info"]["weight_version"] for o in r.json()] == [version] * len(CHATS)
    return [o["embedding"][0] for o in r.json()]


def transformers_rewards(path: str) -> list[float]:
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        return [model(torch.tensor([tok(c)["input_ids"]])).logits[0, 0].item() for c in CHATS]


def update(server: ServerProcess, path: str, version: str) -> requests.Response:
    return server.post("/update_weights_from_disk", json={"model_path": path, "weight_version": version})


def test_classify_follows_disk_updates(server, paths):
    old = classify(server, "a")
    assert old == pytest.approx(transformers_rewards(paths["a"]), abs=1e-4)
    want_b = transformers_rewards(paths["b"])
    assert max(abs(x - y) for x, y in zip(old, want_b)) > 1e-2  # the two checkpoints score differently

    r = update(server, paths["b"], "b")
    assert r.status_code == 200 and r.json() == {"success": True, "message": "Succeeded to update model weights."}
    assert classify(server, "b") == pytest.approx(want_b, abs=1e-4)
    assert server.get("/get_model_info").json()["weight_version"] == "b"

    assert update(server, paths["a"], "a2").status_code == 200
    assert classify(server, "a2") == old  # the same batch on an empty cache: bitwise the old scores


def test_wrong_shape_checkpoint_is_refused(server, paths):
    assert update(server, paths["a"], "a3").status_code == 200
    before = classify(server, "a3")
    r = update(server, paths["wrong"], "never")
    assert r.status_code == 400, r.text
    message = r.json()["message"]
    assert message.startswith("Failed to update weights: Shape mismatch for score.weight"), message
    assert message.endswith(".\nRolling back to original weights."), message
    # The failed update left the cached prefixes in place: computed again or read back, the same rewards.
    assert classify(server, "a3") == pytest.approx(before, abs=1e-5)
    assert server.get("/get_model_info").json()["model_path"] == paths["a"]
