"""Routed experts and the expert distribution record over HTTP: a MoE server and a dense one.

The RL case end to end: a rollout through /generate with return_routed_experts (RolloutClient decodes
`GenerateResult.routed_experts`), and a trainer whose router weights differ slightly from the server's
(tests/test_routing_replay.py's tied expert pairs, so natural routing flips on some tokens). With
`sync.routing_replay.replay_routing` fed the decoded ids, the trainer's logprobs are the rollout's within 1e-5
on every token; without it they are not. Also: the ids equal transformers' top-k on the served weights,
the record routes count what transformers' routers count, bad fields and dense models are 400s naming the
field, and the server serves afterwards.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
import torch

from rollout.client import RolloutClient
from sync.routing_replay import replay_routing
from tests.helpers import ServerProcess
from tests.test_routing_replay import FAMILIES, _hf, _hf_routing, _tied_pair_models, _token_logprobs

pytestmark = pytest.mark.timeout(300)

FLAGS = ["--device", "cpu", "--dtype", "float32", "--skip-tokenizer-init", "--max-total-tokens", "2048",
         "--chunked-prefill-size", "24", "--log-level", "warning"]


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    family, overrides = FAMILIES["qwen3-moe-norm"]
    served = tmp_path_factory.mktemp("served-moe")
    trainer = _tied_pair_models(tiny_model_dir(family, **overrides), str(served))
    record_dir = tmp_path_factory.mktemp("record")
    moe = ServerProcess([*FLAGS, "--model-path", str(served), "--expert-distribution-dir", str(record_dir)])
    dense = ServerProcess([*FLAGS, "--model-path", tiny_model_dir("llama")])
    for s in (moe, dense):
        s.spawn()  # both load at once
    for s in (moe, dense):
        s.wait_ready(240)
    yield {"moe": moe, "dense": dense, "trainer": trainer, "rollout": _hf(str(served)), "record_dir": record_dir}
    for s in (moe, dense):
        assert s.stop() == 0, s.log()


def _serves(server: ServerProcess) -> None:
    r = server.post("/generate", json={"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2}})
    assert r.status_code == 200 and len(r.json()["output_ids"]) == 2, r.text


def test_rollout_routing_replays_in_the_trainer(setup):
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (6, 29, 50)]
    with RolloutClient(setup["moe"].url) as client:
        results = [r[0] for r in client.generate(
            prompts, {"temperature": 1.0, "max_new_tokens": 24, "ignore_eos": True, "sampling_seed": 1},
            return_logprob=True, return_routed_experts=True)]
    trainer, rollout = setup["trainer"], setup["rollout"]
    replay_gap, natural_gap, flipped, tokens = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for prompt, res in zip(prompts, results):
            ids = prompt + res.output_ids
            routing = res.routed_experts  # [len(ids) - 1, MoE layers, top_k]: every position that ran
            assert routing.shape == (len(ids) - 1, 2, 2) and res.meta_info["routed_experts_start_len"] == 0
            assert torch.equal(routing, _hf_routing(rollout, ids[:-1]))
            sampled = torch.tensor(res.output_logprobs)
            inputs = torch.tensor([ids[:-1]])
            natural = trainer(inputs).logits[0]
            with replay_routing(trainer, routing[None]):
                replayed = trainer(inputs).logits[0]
            replay_gap = max(replay_gap, float((_token_logprobs(replayed, ids, len(prompt)) - sampled).abs().max()))
            natural_gap = max(natural_gap, float((_token_logprobs(natural, ids, len(prompt)) - sampled).abs().max()))
            own = _hf_routing(trainer, ids[:-1])
            flipped += int((own.sort(-1).values != routing.sort(-1).values).any(-1).any(-1).sum())
            tokens += len(ids) - 1
    print(f"/generate rollout: trainer routing differs on {flipped} of {tokens} tokens; max |trainer - rollout| "
          f"logprob: with replay {replay_gap:.2e}, without {natural_gap:.2e}")
    assert flipped > 0
    assert replay_gap < 1e-5
    assert natural_gap > 1e-3


def test_start_len_and_bad_fields(setup):
    server = setup["moe"]
    prompt = list(range(10, 30))
    body = {"input_ids": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True},
            "return_routed_experts": True, "routed_experts_start_len": 15}
    r = server.post("/generate", json=body)
    assert r.status_code == 200, r.text
    meta = r.json()["meta_info"]
    assert meta["routed_experts_shape"] == [20 + 4 - 1 - 15, 2, 2] and meta["routed_experts_start_len"] == 15
    for field, value, message in (("routed_experts_start_len", 21, "routed_experts_start_len must be in [0, 20]"),
                                  ("routed_experts_start_len", "3", "routed_experts_start_len must be an integer"),
                                  ("return_routed_experts", "yes", "return_routed_experts must be a boolean")):
        r = server.post("/generate", json={**body, field: value})
        assert r.status_code == 400, r.text
        assert message in r.json()["error"]["message"] and repr(value)[:3] in r.json()["error"]["message"]
    _serves(server)


def test_dense_model_refuses_routing_fields_and_routes(setup):
    dense = setup["dense"]
    r = dense.post("/generate", json={"input_ids": [5, 6, 7], "return_routed_experts": True})
    assert r.status_code == 400 and "return_routed_experts=True needs a mixture-of-experts model" in r.text
    for action in ("start", "stop", "dump"):
        r = dense.post(f"/{action}_expert_distribution_record")
        assert r.status_code == 400, r.text
        assert f"/{action}_expert_distribution_record needs a mixture-of-experts model" in r.json()["error"]["message"]
    _serves(dense)


def test_record_routes_count_what_transformers_routes(setup):
    server, rollout = setup["moe"], setup["rollout"]
    assert server.post("/start_expert_distribution_record").json()["success"]
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (7, 33)]
    with RolloutClient(server.url) as client:
        results = [r[0] for r in client.generate(prompts, {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True})]
    assert server.post("/stop_expert_distribution_record").json()["success"]
    _serves(server)  # not recorded: stopped
    r = server.post("/dump_expert_distribution_record")
    assert r.status_code == 200, r.text
    body = r.json()
    want, tokens = torch.zeros(2, 8, dtype=torch.int64), 0
    for prompt, res in zip(prompts, results):
        ids = prompt + res.output_ids
        ran = _hf_routing(rollout, ids[:-1])[res.cached_tokens:]  # a prefix hit is not routed again
        tokens += ran.shape[0]
        want += torch.stack([torch.bincount(ran[:, j].reshape(-1), minlength=8) for j in range(2)])
    rows = list(csv.reader(io.StringIO(body["csv"])))
    assert rows[0] == ["layer_id", "expert_id", "count"]
    assert [[int(x) for x in row] for row in rows[1:]] == [[l, e, int(want[l, e])] for l in range(2) for e in range(8)]
    assert Path(body["path"]).parent == setup["record_dir"] and Path(body["path"]).is_file()
    assert Path(body["csv_path"]).read_text() == body["csv"]
    assert body["summary"]["num_tokens"] == tokens and body["summary"]["mode"] == "stat"
    r = server.post("/dump_expert_distribution_record", data=b"{not json")
    assert r.status_code == 400
    _serves(server)
