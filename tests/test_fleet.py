"""A fleet on a local Ray cluster: three single-thread CPU servers on a tiny random Llama, placed by Ray,
sglang-router in front. Rollouts spread over all three; one broadcast (world size 1 + 3) updates all three
(greedy then equals transformers on the new weights, on each); a server SIGKILLed mid-rollout loses no
request, is replaced (serving the checkpoint the fleet was told) and joins the next update; shutdown leaves
no process behind. `import rollout` never imports ray.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import requests
import torch
from transformers import AutoModelForCausalLM

from rollout import WeightUpdateError
from tests.helpers import make_tiny_model_dir
from tests.weight_trainer import hf_greedy

PROMPT = "The quick brown fox jumps over the lazy dog."
GREEDY = {"max_new_tokens": 8, "temperature": 0}


def test_import_rollout_does_not_import_ray():
    code = ("import sys, rollout, rollout.client, rollout.client.server_actor, rollout.client.router_admin; "
            "from rollout import RolloutClient, LocalRouter; assert 'ray' not in sys.modules, 'ray imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


ray = pytest.importorskip("ray", reason="the fleet needs ray: pip install .[fleet]")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return [make_tiny_model_dir(tmp_path_factory.mktemp(f"fleet-{seed}"), context_length=1024, seed=seed)
            for seed in range(3)]


@pytest.fixture(scope="module")
def fleet(model_dirs):
    from rollout.client.fleet import Fleet
    args = {"model_path": model_dirs[0], "device": "cpu", "dtype": "float32", "num_threads": 1,
            "max_total_tokens": 8192, "log_level": "warning", "enable_metrics": True}
    f = Fleet.launch(3, args)
    yield f
    f.shutdown()



def finished_requests(url: str) -> float:
    text = requests.get(url + "/metrics", timeout=30).text
    return float(re.search(r"^sglang:num_requests_total(?:\{[^}]*\})? (\S+)$", text, re.M).group(1))


def running_requests(url: str) -> float:
    text = requests.get(url + "/metrics", timeout=30).text
    return float(re.search(r"^sglang:num_running_reqs(?:\{[^}]*\})? (\S+)$", text, re.M).group(1))


def prompt_ids(fleet) -> list[int]:
    return requests.post(fleet.workers[0] + "/tokenize", json={"prompt": PROMPT}, timeout=30).json()["tokens"]


def push(fleet, model_dir: str, version: str) -> None:
    """One broadcast to every server: a group per update, so a replaced server is in it."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    group = fleet.client.init_weights_update_group()
    try:
        assert group.world_size == 1 + len(fleet.workers)
        fleet.client.update_weights_from_distributed(group, model.named_parameters(), weight_version=version)
    finally:
        fleet.client.destroy_weights_update_group(group)
    fleet.check_versions(version)


def greedy_on_each(fleet, ids: list[int]) -> list[list[int]]:
    return [requests.post(u + "/generate", json={"input_ids": ids, "sampling_params": GREEDY}, timeout=120)
            .json()["output_ids"] for u in fleet.workers]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_rollouts_spread_over_every_server(fleet):
    assert fleet.client.router_urls == [fleet.router_url] and len(fleet.workers) == 3
    before = [finished_requests(u) for u in fleet.workers]
    prompts = [f"Question {i}: what is {i} plus {2 * i}? Think step by step." for i in range(24)]
    groups = fleet.client.generate(prompts, {"max_new_tokens": 4, "temperature": 1.0}, n=2)
    assert [len(g) for g in groups] == [2] * 24 and all(len(r.output_ids) == 4 for g in groups for r in g)
    served = [finished_requests(u) - b for u, b in zip(fleet.workers, before)]
    assert sum(served) >= 48 and all(s > 0 for s in served), served


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_one_broadcast_updates_every_server(fleet, model_dirs):
    ids = prompt_ids(fleet)
    push(fleet, model_dirs[1], "v1")
    want = hf_greedy(model_dirs[1], ids, 8)
    assert greedy_on_each(fleet, ids) == [want] * 3
    with pytest.raises(WeightUpdateError, match="expected 'v9'.*3 of 3"):
        fleet.check_versions("v9")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_server_killed_mid_rollout_is_replaced_and_updated(fleet, model_dirs):
    ids = prompt_ids(fleet)
    fleet.set_checkpoint(model_dirs[1], "v1")  # what the trainer pushed last, saved
    victim = fleet.server_pids()[1]
    url = fleet.workers[1]
    results: list = []
    prompts = [f"Rollout {i} of the killed server test." for i in range(48)]
    rollout = threading.Thread(target=lambda: results.append(
        fleet.client.generate(prompts, {"max_new_tokens": 96, "temperature": 1.0, "ignore_eos": True})))
    rollout.start()
    deadline = time.monotonic() + 60
    while running_requests(url) == 0:  # kill it with requests in flight
        assert time.monotonic() < deadline and rollout.is_alive(), "no request reached the victim"
        time.sleep(0.05)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    rollout.join(300)
    assert results, "the rollout did not finish"
    assert [len(g[0].output_ids) for g in results[0]] == [96] * 48  # no request lost

    dead = fleet.wait_for("dead", timeout=30)[0]
    assert dead.slot == 1 and dead.at - killed_at < 5.0, dead
    replaced = fleet.wait_for("replaced", timeout=300)[0]
    assert replaced.url == url and fleet.workers[1] == url and fleet.server_pids()[1] != victim
    assert fleet.versions()[url] == "v1"  # the replacement loaded the fleet's checkpoint
    assert greedy_on_each(fleet, ids)[1] == hf_greedy(model_dirs[1], ids, 8)

    push(fleet, model_dirs[2], "v2")  # the next update includes the replacement
    assert greedy_on_each(fleet, ids) == [hf_greedy(model_dirs[2], ids, 8)] * 3
    groups = fleet.client.generate(prompts[:6], GREEDY)
    assert all(g[0].weight_version == "v2" for g in groups)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_shutdown_leaves_no_process(fleet):
    pids = [p for p in fleet.server_pids() if p]
    pids += [c.pid for p in list(pids) for c in psutil.Process(p).children(recursive=True)]  # engines
    pids.append(fleet.router.proc.pid)
    assert len(pids) >= 4
    fleet.shutdown()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.2)
    assert [p for p in pids if _running(p)] == []


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
