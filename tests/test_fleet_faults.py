"""A fleet that loses a node's worth of itself: the Ray actor holding a server dies (its process SIGKILLed, as
when its node goes), not only the server. On a local Ray cluster with two single-thread servers of a tiny
random Llama behind sglang-router: the rollout running across it loses no prompt (each request lost with the
server is resent once, by the client), the fleet notices within seconds, takes the server out of the router,
leaves no orphan server behind, starts a replacement (a new actor, so maybe a new address, which the
trainer's very client object follows) that joins the next broadcast; an actor ended by ray.kill is replaced
from the checkpoint the trainer saved; shutdown leaves no process behind.
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

from tests.helpers import make_tiny_model_dir
from tests.weight_trainer import hf_greedy


GREEDY = {"max_new_tokens": 8, "temperature": 0}


def metric(url: str, name: str) -> float:
    text = requests.get(url + "/metrics", timeout=30).text
    return float(re.search(rf"^sglang:{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.M).group(1))


def family(pid: int) -> list[int]:
    """`pid` and its descendants (a server and its engine)."""
    try:
        return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(running(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if running(p)]


def test_a_server_dies_with_the_process_that_spawned_it(tmp_path) -> None:
    """ServerActor's guarantee without Ray in the way: a parent SIGKILLed (as a lost actor is) takes its
    die_with_parent server with it, whatever the cluster manager does about orphans."""
    code = ("import sys, time; from rollout.client.local_server import LocalServer; "
            "s = LocalServer(sys.argv[1], device='cpu', dtype='float32', num_threads=1, die_with_parent=True)"
            ".spawn(); print(s.proc.pid, flush=True); time.sleep(600)")
    model = make_tiny_model_dir(tmp_path / "tiny", context_length=256)
    parent = subprocess.Popen([sys.executable, "-c", code, model], stdout=subprocess.PIPE, text=True)
    server = 0
    try:
        server = int(parent.stdout.readline())
        assert running(server)
        parent.kill()
        parent.wait(10)
        assert wait_gone([server], 10) == []
    finally:
        parent.kill()
        if server and running(server):
            os.kill(server, signal.SIGKILL)


ray = pytest.importorskip("ray", reason="the fleet needs ray: pip install .[fleet]")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_lost_actor_is_replaced_and_joins_the_next_update(tmp_path_factory: pytest.TempPathFactory) -> None:
    from rollout.client.fleet import Fleet
    from rollout.client.router_admin import listed_workers

    dirs = [make_tiny_model_dir(tmp_path_factory.mktemp(f"lost-{seed}"), context_length=1024, seed=seed)
            for seed in range(2)]
    args = {"model_path": dirs[0], "device": "cpu", "dtype": "float32", "num_threads": 1,
            "max_total_tokens": 8192, "log_level": "warning", "enable_metrics": True}
    fleet = Fleet.launch(2, args, poll_s=0.5)
    pids: list[int] = [fleet.router.proc.pid]
    try:
        client = fleet.client  # what a trainer holds for the whole run
        victim_url = fleet.workers[1]
        actor_pid = ray.get(fleet.actors[1].actor_pid.remote(), timeout=30)
        server_family = family(fleet.server_pids()[1])
        assert len(server_family) >= 2  # the server and its engine
        pids += [actor_pid, *server_family, ray.get(fleet.actors[0].actor_pid.remote(), timeout=30),
                 *family(fleet.server_pids()[0])]

        before = metric(fleet.workers[0], "num_requests_total")
        victim_before = metric(victim_url, "num_requests_total")
        prompts = [[10 + i, 20 + i, 30 + i] for i in range(12)]
        outcome: list = []
        rollout = threading.Thread(target=lambda: outcome.append(
            client.generate(prompts, {"max_new_tokens": 200, "temperature": 1.0, "ignore_eos": True})))
        rollout.start()
        deadline = time.monotonic() + 60
        while metric(victim_url, "num_running_reqs") == 0:  # the node goes with requests in flight
            assert time.monotonic() < deadline and rollout.is_alive(), "no request reached the victim"
            time.sleep(0.05)
        answered_by_victim = metric(victim_url, "num_requests_total") - victim_before  # 0 but for a race
        lost_at = time.monotonic()
        os.kill(actor_pid, signal.SIGKILL)

        assert wait_gone(server_family, 10) == []  # the server and its engine died with their actor
        rollout.join(180)
        assert outcome and [len(g[0].output_ids) for g in outcome[0]] == [200] * 12  # no prompt lost
        assert 1 <= client.resends <= 12 - answered_by_victim
        dead = fleet.wait_for("dead", timeout=30)[0]
        assert dead.slot == 1 and dead.detail.startswith("actor") and dead.at - lost_at < 5.0, dead
        replaced = fleet.wait_for("replaced", timeout=120)[0]
        assert [e.kind for e in fleet.events] == ["dead", "replaced"], fleet.events

        # The survivor ran every prompt the victim had not answered, each once (and the replacement none,
        # or the rest): no prompt ran to the end twice.
        new_url = fleet.workers[1]
        ran = metric(fleet.workers[0], "num_requests_total") - before + metric(new_url, "num_requests_total")
        assert 12 - answered_by_victim - 1 <= ran <= 12 - answered_by_victim, (ran, answered_by_victim)
        assert replaced.url == new_url and client.urls == fleet.workers  # the trainer's client follows
        assert sorted(w["url"].rstrip("/") for w in listed_workers(fleet.router_url)) == sorted(fleet.workers)
        new_actor_pid = ray.get(fleet.actors[1].actor_pid.remote(), timeout=30)
        assert new_actor_pid != actor_pid
        pids += [new_actor_pid, *family(fleet.server_pids()[1])]

        model = AutoModelForCausalLM.from_pretrained(dirs[1], dtype=torch.float32)
        group = client.init_weights_update_group()  # the next update: 1 + 2, the replacement included
        try:
            assert group.world_size == 3
            client.update_weights_from_distributed(group, model.named_parameters(), weight_version="v1")
        finally:
            client.destroy_weights_update_group(group)
        fleet.check_versions("v1")
        ids = [5, 6, 7, 8]
        want = hf_greedy(dirs[1], ids, 8)
        assert [requests.post(u + "/generate", json={"input_ids": ids, "sampling_params": GREEDY}, timeout=60)
                .json()["output_ids"] for u in fleet.workers] == [want, want]
        assert [g[0].output_ids for g in client.generate([ids] * 4, GREEDY)] == [want] * 4

        # ray.kill, the other way an actor goes: the replacement loads the checkpoint the trainer saved.
        fleet.set_checkpoint(dirs[1], "v1")
        server_family = family(fleet.server_pids()[0])
        ray.kill(fleet.actors[0])
        assert wait_gone(server_family, 10) == []
        fleet.wait_for("replaced", count=2, timeout=120)
        pids += [ray.get(fleet.actors[0].actor_pid.remote(), timeout=30), *family(fleet.server_pids()[0])]
        assert client.urls == fleet.workers and fleet.check_versions("v1")
        assert [g[0].output_ids for g in client.generate([ids] * 4, GREEDY)] == [want] * 4
    finally:
        fleet.shutdown()
    assert wait_gone(pids, 30) == []  # actors (the lost one too), servers, engines, router
