"""Hot weight updates over HTTP: a real server (two for the broadcast), a trainer process, gloo on CPU.

The trainer (tests/weight_trainer.py) uses rollout.RolloutClient: it joins the group while posting
/init_weights_update_group to both servers (world size 3), pushes seeded perturbations per tensor and in
buckets, and destroys the group. The test checks each server's weights (get_weights_by_name) and greedy
output against transformers on the same tensors, versions everywhere, disk switches and their failure
messages, bad bodies (400 naming the field), and a trainer killed mid-broadcast (the server then serves
the old weights, or answers 503 until the next good update; never a mix, and never hangs). The first
server receives broadcasts directly into its weights, the second buffers them (--weight-update-receive).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch

from tests.helpers import ServerProcess, free_port
from sync import encode_named_tensors
from tests.weight_trainer import hf_greedy, perturbed

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [5, 17, 99, 42, 7, 200, 31, 64, 128, 3, 11, 12]
N = 8
RECEIVE_MODES = ("direct", "buffered")  # servers[0], servers[1]
CHECK_NAMES = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight",
               "lm_head.weight")


@pytest.fixture(scope="module")
def servers(checkpoints):
    # The first receives broadcasts straight into its weights (the default), the second buffers them.
    procs = [ServerProcess(["--device", "cpu", "--dtype", "float32",
                            "--model-path", checkpoints["a"], "--skip-tokenizer-init", "--max-total-tokens", "4096",
                            "--log-level", "warning", "--weight-version", "v0", "--weight-update-receive", mode])
             for mode in RECEIVE_MODES]
    for p in procs:
        p.spawn()  # both load at once
    for p in procs:
        p.wait_ready(300)
    yield procs
    for p in procs:
        assert p.stop() == 0, p.log()


def greedy(server: ServerProcess) -> dict:
    r = server.post("/generate", json={"input_ids": PROMPT, "return_logprob": True,
                                       "sampling_params": {"temperature": 0, "max_new_tokens": N, "ignore_eos": True}})
    assert r.status_code == 200, r.text
    return r.json()


def check_serves(server: ServerProcess, named: list | None, version: str, model_dir: str) -> None:
    out = greedy(server)
    assert out["output_ids"] == hf_greedy(model_dir, PROMPT, N, named)
    assert out["meta_info"]["weight_version"] == version
    assert out["meta_info"]["output_token_weight_versions"] == [version] * N
    assert server.get("/get_model_info").json()["weight_version"] == version
    if named is not None:
        want = dict(named)
        for name in CHECK_NAMES:
            got = server.post("/get_weights_by_name", json={"name": name, "truncate_size": 2})
            assert got.status_code == 200, got.text
            assert torch.equal(torch.tensor(got.json()), want[name][:2]), name


class Trainer:
    def __init__(self, cfg: dict):
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "weight_trainer.py"), json.dumps(cfg)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)

    def line(self) -> str:
        out = self.proc.stdout.readline().strip()
        assert out, f"trainer exited with {self.proc.wait()}"
        return out

    def go(self) -> str:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return self.line()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def test_broadcast_to_two_servers(servers, checkpoints):
    updates = [{"scale": 0.1, "seed": 3, "version": "v1", "load_format": None},
               {"scale": 0.2, "seed": 4, "version": "v2"}]
    t = Trainer({"urls": [s.url for s in servers], "port": free_port(), "ckpt": checkpoints["a"], "updates": updates})
    try:
        assert t.line() == "joined"
        for i, u in enumerate(updates):
            assert t.go() == f"done {i}"
            named = perturbed(checkpoints["a"], u["scale"], u["seed"])
            for s in servers:
                check_serves(s, named, u["version"], checkpoints["a"])
        assert t.go() == "destroyed"
    finally:
        t.close()
    r = servers[0].post("/destroy_weights_update_group", json={})
    assert r.status_code == 400 and "No weight-update group named 'weight_update_group'" in r.json()["message"]


def test_disk_switch_back_and_failures(servers, checkpoints):
    s = servers[0]
    assert s.post("/update_weights_from_disk", json={"model_path": checkpoints["b"], "weight_version": "b"}).json() == \
        {"success": True, "message": "Succeeded to update model weights."}
    check_serves(s, None, "b", checkpoints["b"])
    assert s.get("/get_model_info").json()["model_path"] == checkpoints["b"]
    r = s.post("/update_weights_from_disk", json={"model_path": checkpoints["a"], "weight_version": "a"})
    assert r.json()["success"]
    check_serves(s, None, "a", checkpoints["a"])
    r = s.post("/update_weights_from_disk", json={"model_path": "/nope/ckpt", "weight_version": "x"})
    assert r.status_code == 400
    assert r.json() == {"success": False,
                        "message": "Failed to get weights iterator: /nope/ckpt (repository not found)."}
    r = s.post("/update_weights_from_disk", json={"model_path": checkpoints["wide"], "weight_version": "x"})
    assert r.status_code == 400 and not r.json()["success"]
    assert r.json()["message"].startswith("Failed to update weights: Shape mismatch for model.layers.0.mlp.")
    assert r.json()["message"].endswith(".\nRolling back to original weights.")
    check_serves(s, None, "a", checkpoints["a"])
    assert s.get("/get_model_info").json()["model_path"] == checkpoints["a"]


def test_tensor_update_over_http(servers, checkpoints):
    s = servers[1]
    named = perturbed(checkpoints["a"], 0.05, seed=9)
    r = s.post("/update_weights_from_tensor", json={"serialized_named_tensors": [encode_named_tensors(named)],
                                                    "weight_version": "t1"})
    assert r.json() == {"success": True, "message": "Succeeded to update model weights."}
    check_serves(s, named, "t1", checkpoints["a"])
    import base64
    import pickle
    evil = base64.b64encode(pickle.dumps({"x": 1})).decode()
    r = s.post("/update_weights_from_tensor", json={"serialized_named_tensors": [evil]})
    assert r.status_code == 400 and "pickle" in r.json()["message"]
    check_serves(s, named, "t1", checkpoints["a"])


@pytest.mark.parametrize("path, body, field", [
    ("/update_weights_from_disk", {}, "model_path is required."),
    ("/update_weights_from_disk", {"model_path": 3}, "model_path must be a string, got 3."),
    ("/update_weights_from_disk", {"model_path": "x", "flush_cache": "yes"}, "flush_cache must be a boolean"),
    ("/init_weights_update_group", {"master_address": "h", "master_port": 1, "rank_offset": 1, "world_size": "2"},
     "world_size must be an integer, got '2'."),
    ("/init_weights_update_group", {"master_address": "h", "master_port": 1, "rank_offset": 2, "world_size": 2},
     "rank_offset must be in [1, world_size - 1]"),
    ("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1,
                                    "world_size": 2, "backend": "nccl"}, "backend='nccl' needs a CUDA device"),
    ("/init_weights_update_group", {"master_address": "h", "master_port": 1, "rank_offset": 1, "world_size": 2,
                                    "backend": "mpi"}, "backend must be 'nccl' or 'gloo', got 'mpi'."),
    ("/update_weights_from_distributed", {"names": ["a"], "dtypes": [], "shapes": [[1]]},
     "names, dtypes and shapes must have the same length, got 1, 0, 1."),
    ("/update_weights_from_distributed", {"names": ["a"], "dtypes": ["float33"], "shapes": [[1]]},
     "dtypes[0] must be a torch dtype name such as 'bfloat16', got 'float33'."),
    ("/update_weights_from_tensor", {"serialized_named_tensors": []}, "serialized_named_tensors must be"),
    ("/get_weights_by_name", {"name": "lm_head.weight", "truncate_size": 0}, "truncate_size must be a positive"),
    ("/get_weights_by_name", {"name": "nope"}, "Unknown weight nope"),
    ("/update_weight_version", {}, "new_version is required."),
    ("/pause_generation", {"mode": "sideways"}, "mode must be one of ['abort', 'retract', 'in_place'], got 'sideways'."),
    ("/release_memory_occupation", {"tags": ["gpu"]}, "tags must be a non-empty subset"),
])
def test_bad_bodies_are_400(servers, path, body, field):
    s = servers[1]
    r = s.post(path, json=body)
    assert r.status_code == 400, r.text
    message = r.json().get("message") or r.json()["error"]["message"]
    assert field in message
    assert greedy(s)["meta_info"]["finish_reason"]["type"] == "length"  # still serving


def test_join_without_trainer_fails_in_bounded_time(servers):
    s = servers[1]
    port = free_port()
    start = time.monotonic()
    r = s.post("/init_weights_update_group", json={"master_address": "127.0.0.1", "master_port": port,
                                                   "rank_offset": 1, "world_size": 2, "backend": "gloo",
                                                   "timeout": 2})
    assert time.monotonic() - start < 10
    assert r.status_code == 400
    msg = r.json()["message"]
    assert msg.startswith("Failed to initialize custom process group: ") and f"127.0.0.1:{port}" in msg
    assert greedy(s)["meta_info"]["finish_reason"]["type"] == "length"


@pytest.mark.parametrize("mode", RECEIVE_MODES)
@pytest.mark.parametrize("load_format, after", [(None, 3), ("flattened_bucket", 2)])
def test_trainer_killed_mid_broadcast(servers, checkpoints, load_format, after, mode):
    s = servers[RECEIVE_MODES.index(mode)]
    s.post("/update_weights_from_disk", json={"model_path": checkpoints["a"], "weight_version": "before"})
    before = greedy(s)["output_ids"]
    cfg = {"urls": [s.url], "port": free_port(), "ckpt": checkpoints["a"], "timeout": 30,
           "updates": [{"scale": 0.3, "seed": 5, "version": "never", "load_format": load_format}],
           "kill": {"update": 0, "after": after}}
    t = Trainer(cfg)
    try:
        assert t.line() == "joined"
        t.proc.stdin.write("\n")
        t.proc.stdin.flush()
        assert t.proc.wait(30) == -9
    finally:
        t.close()
    start = time.monotonic()
    # Answered after the broken update (same queue): the server has given up on the broadcast.
    r = s.post("/get_weights_by_name", json={"name": "model.norm.weight"}, timeout=60)
    assert time.monotonic() - start < 15
    r = s.post("/generate", json={"input_ids": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": N,
                                                                           "ignore_eos": True}})
    if load_format is None and mode == "buffered":  # nothing was copied: the old weights serve
        assert r.status_code == 200 and r.json()["output_ids"] == before
        assert r.json()["meta_info"]["weight_version"] == "before"
    else:  # an earlier bucket was applied, or tensors were received into the weights: 503 until a good update
        assert r.status_code == 503, r.text
        assert "mix of old and new" in r.json()["error"]["message"]
        assert s.get("/health").status_code == 200
        assert s.post("/update_weights_from_disk", json={"model_path": checkpoints["a"], "weight_version": "after"}).ok
        assert greedy(s)["output_ids"] == before
    assert s.post("/destroy_weights_update_group", json={}).json()["success"]


def test_pause_in_place_spans_update_and_memory_release(servers, checkpoints):
    import threading

    s = servers[1]
    assert s.post("/update_weights_from_disk", json={"model_path": checkpoints["a"], "weight_version": "p0"}).ok
    assert s.post("/pause_generation", json={"mode": "in_place"}).json()["success"]
    results: list = []
    body = {"input_ids": PROMPT, "return_logprob": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": N, "ignore_eos": True}}
    t = threading.Thread(target=lambda: results.append(s.post("/generate", json=body)))
    t.start()
    time.sleep(0.5)
    assert not results  # /generate waits while paused
    assert s.post("/update_weights_from_disk", json={"model_path": checkpoints["b"], "weight_version": "p1"}).ok
    assert s.post("/continue_generation", json={}).json()["success"]
    t.join(30)
    out = results[0].json()
    assert out["meta_info"]["output_token_weight_versions"] == ["p1"] * N  # queued: every token from p1
    assert out["output_ids"] == hf_greedy(checkpoints["b"], PROMPT, N)

    # Memory: release needs no request holding KV; on the CPU released weights come back empty: 503.
    assert s.post("/release_memory_occupation", json={"tags": ["kv_cache", "weights"]}).json()["success"]
    assert s.post("/resume_memory_occupation", json={}).json()["success"]
    r = s.post("/generate", json=body)
    assert r.status_code == 503 and "update the weights" in r.json()["error"]["message"]
    assert s.post("/update_weights_from_disk", json={"model_path": checkpoints["a"], "weight_version": "p2"}).ok
    check_serves(s, None, "p2", checkpoints["a"])
