"""End to end on the real default model (SmolLM2-135M-Instruct, served when --model-path is omitted):
the server's answers match transformers on the same weights, as a trainer recomputing them would see."""

from __future__ import annotations

import json

import pytest
import requests

from tests.helpers import ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess(["--device", "cpu", "--dtype", "float32",
                          "--max-total-tokens", "30000", "--log-level", "warning"]).start(timeout=600)
    yield proc
    assert proc.stop() == 0, proc.log()


def generate(server, **body):
    resp = requests.post(server.url + "/generate", json=body, timeout=300)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_capital_of_france(server):
    out = generate(server, text="The capital of France is", sampling_params={"max_new_tokens": 4, "temperature": 0})
    assert out["text"].startswith(" Paris"), out["text"]
    info = requests.get(server.url + "/get_model_info", timeout=60).json()
    assert info["model_type"] == "llama" and info["model_path"].endswith("SmolLM2-135M-Instruct")


def test_logprobs_match_transformers(server):
    import torch
    from transformers import AutoModelForCausalLM

    prompt = "Reinforcement learning from human feedback trains a policy"
    out = generate(server, text=prompt, return_logprob=True, logprob_start_len=0,
                   sampling_params={"max_new_tokens": 12, "temperature": 1.0, "sampling_seed": 7, "ignore_eos": True})
    meta = out["meta_info"]
    prompt_ids = requests.post(server.url + "/tokenize", json={"prompt": prompt}, timeout=60).json()["tokens"]
    model_path = requests.get(server.url + "/get_model_info", timeout=60).json()["model_path"]
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids + out["output_ids"]])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    targets = ids[0, 1:]
    expected = lp[:-1].gather(1, targets[:, None]).squeeze(1).tolist()
    got_in = [e[0] for e in meta["input_token_logprobs"][1:]]
    got_out = [e[0] for e in meta["output_token_logprobs"]]
    n_in = len(prompt_ids) - 1
    assert max(abs(a - b) for a, b in zip(got_in, expected[:n_in])) < 1e-4
    assert max(abs(a - b) for a, b in zip(got_out, expected[n_in:])) < 1e-4


def test_stream_and_n_on_real_model(server):
    resp = requests.post(server.url + "/generate", timeout=300, json={
        "text": "Write a haiku about the sea.", "stream": True,
        "sampling_params": {"max_new_tokens": 24, "temperature": 0.7, "n": 3}})
    events = [e for e in resp.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    finals = {}
    for e in events[:-1]:
        chunk = json.loads(e[len("data: "):])
        if chunk["meta_info"]["finish_reason"] is not None:
            finals[chunk["index"]] = chunk
    assert sorted(finals) == [0, 1, 2]
    assert sum(c["meta_info"]["cached_tokens"] > 0 for c in finals.values()) >= 2
