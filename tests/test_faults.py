"""Faults against a real server on a tiny model: every one ends in a clear status, the old or the new weights
serving (never a mix), and never a dead or silent engine.

- a trainer killed between broadcast buckets (direct and buffered receive): /generate answers 503 with the
  reason at once, with no control message in between (the engine pushes its state);
- a trainer killed mid-bucket: tests/test_weights_server.py's test_trainer_killed_mid_broadcast;
- a checkpoint truncated and rewritten while /update_weights_from_disk reads it: 200 or a 400 naming the
  file, the engine alive, generation exact afterwards (with mmap reads the engine died of SIGBUS);
- NaN weights (tensor payload, broadcast) and digests that do not match: 400, the old weights serving;
- finite weights that overflow (NaN logits): the request ends with an error naming it, no garbage token;
- a join to a master nobody runs: generation keeps flowing (< 1 s per request) during the join;
- /health answers at once while the engine applies an update (here one waiting 3 s for its bytes);
- the engine SIGKILLed: in-flight requests answer 503 naming the signal, /health fails, the server exits 1;
- SIGTERM under load: every in-flight request answered, exit 0.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from sync import encode_named_tensors, iterate_checkpoint, tensor_checksum
from tests.helpers import ServerProcess, free_port

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [5, 17, 99, 42, 7, 200, 31, 64]
N = 6
GREEDY = {"input_ids": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": N, "ignore_eos": True}}


def _flags(path: str, *extra: str) -> list[str]:
    return ["--device", "cpu", "--dtype", "float32", "--model-path", path, "--skip-tokenizer-init",
            "--max-total-tokens", "4096", "--log-level", "warning", *extra]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_model_dir) -> str:
    dst = tmp_path_factory.mktemp("faults") / "ckpt"
    shutil.copytree(tiny_model_dir("llama"), dst)
    return str(dst)


@pytest.fixture(scope="module", params=["direct", "buffered"])
def server(request, ckpt):
    with ServerProcess(_flags(ckpt, "--weight-update-receive", request.param)) as s:
        s.mode = request.param
        yield s


def _greedy(s: ServerProcess) -> list[int]:
    r = s.post("/generate", json=GREEDY)
    assert r.status_code == 200, r.text
    return r.json()["output_ids"]


def _restore(s: ServerProcess, ckpt: str) -> None:
    r = s.post("/update_weights_from_disk", json={"model_path": ckpt, "weight_version": "restored"})
    assert r.status_code == 200, r.text


def _trainer(s: ServerProcess, ckpt: str, **cfg) -> tuple[int, str]:
    cfg = {"url": s.url, "port": free_port(), "ckpt": ckpt, "bucket_bytes": 64 << 10, **cfg}
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "fault_trainer.py"), json.dumps(cfg)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=200)
    return p.returncode, p.stdout + p.stderr


def test_trainer_killed_between_buckets_is_503_at_once(server, ckpt):
    _restore(server, ckpt)
    code, out = _trainer(server, ckpt, buckets=2)
    assert code == -signal.SIGKILL, out
    answers = json.loads(out.split("sent 2 ", 1)[1].splitlines()[0])
    assert [a[0] for a in answers] == [200, 200], answers
    # No request reaches the server in between: it learns the trainer is gone by itself (0.5 s watch) and
    # pushes that to the HTTP process, which refuses at once instead of answering 200 with an empty abort.
    deadline = time.monotonic() + 10
    while True:
        r = server.post("/generate", json=GREEDY)
        if r.status_code == 503 or time.monotonic() > deadline:
            break
        assert r.status_code == 200 and r.json()["meta_info"]["finish_reason"]["type"] == "length", r.text
        time.sleep(0.2)
    assert r.status_code == 503, r.text
    message = r.json()["error"]["message"]
    assert "mix of old and new" in message and "'faults'" in message
    stream = server.post("/generate", json={**GREEDY, "stream": True})
    assert stream.status_code == 503 and "mix of old and new" in stream.json()["error"]["message"]
    assert server.get("/health").status_code == 200  # the engine is fine; the weights are not
    info = server.get("/get_server_info").json()["internal_states"][0]
    assert "mix of old and new" in info["weights_unusable"]
    assert server.post("/destroy_weights_update_group", json={"group_name": "faults"}).json()["success"]
    _restore(server, ckpt)
    assert _greedy(server)


def test_nan_bucket_is_refused(server, ckpt):
    _restore(server, ckpt)
    before = _greedy(server)
    code, out = _trainer(server, ckpt, buckets=1, nan=True)
    assert code == 0, out
    (status, body), = json.loads(out.split("sent 1 ", 1)[1].splitlines()[0])
    assert status == 400 and "non-finite values (1 NaN" in body["message"], body
    r = server.post("/generate", json=GREEDY)
    if server.mode == "buffered":  # checked before the copy: the old weights serve
        assert r.status_code == 200 and r.json()["output_ids"] == before
    else:  # received straight into the weights: refused to serve until the next good update
        assert r.status_code == 503 and "received directly into the weights" in r.json()["error"]["message"]
        _restore(server, ckpt)
    assert _greedy(server) == before
    server.post("/destroy_weights_update_group", json={"group_name": "faults"})


def test_nan_tensor_payload_and_bad_digest_are_400(server, ckpt):
    _restore(server, ckpt)
    before = _greedy(server)
    named = list(iterate_checkpoint(ckpt))[:3]
    bad = [(n, t.clone()) for n, t in named]
    bad[1][1].view(-1)[5] = float("inf")
    r = server.post("/update_weights_from_tensor", json={"serialized_named_tensors": [encode_named_tensors(bad)]})
    assert r.status_code == 400 and f"Weight {bad[1][0]} holds non-finite values (0 NaN, 1 Inf" in r.json()["message"]
    digests = {n: tensor_checksum(t) for n, t in named}
    wrong = {**digests, named[0][0]: digests[named[0][0]] ^ 0xFF}
    payload = [encode_named_tensors(named)]
    r = server.post("/update_weights_from_tensor", json={"serialized_named_tensors": payload, "digests": wrong})
    assert r.status_code == 400 and f"Weight {named[0][0]} does not match its digest" in r.json()["message"]
    r = server.post("/update_weights_from_tensor", json={"serialized_named_tensors": payload, "digests": {"x": -1}})
    assert r.status_code == 400 and "digests['x'] must be a CRC-32" in r.json()["error"]["message"]
    r = server.post("/update_weights_from_tensor", json={"serialized_named_tensors": payload, "digests": digests})
    assert r.status_code == 200, r.text
    assert _greedy(server) == before


def test_weights_that_overflow_end_requests_with_a_clear_error(server, ckpt):
    # Finite weights pass the finiteness check yet can overflow in the forward pass: the logits are NaN and
    # a token drawn from them would be garbage with a NaN logprob. The request ends with the reason instead.
    _restore(server, ckpt)
    before = _greedy(server)
    huge = [(n, t.clone().fill_(3e37)) for n, t in iterate_checkpoint(ckpt) if n.endswith("norm.weight")]
    r = server.post("/update_weights_from_tensor", json={"serialized_named_tensors": [encode_named_tensors(huge)]})
    assert r.status_code == 200, r.text
    for body in (GREEDY, {**GREEDY, "sampling_params": {"max_new_tokens": 3}, "return_logprob": True, "stream": True}):
        r = server.post("/generate", json=body)
        text = r.text
        assert r.status_code == 500 or "error" in text, text[:300]
        assert "logits for the next token are not finite (NaN or Inf)" in text and "NaN," not in text, text[:300]
    _restore(server, ckpt)
    assert _greedy(server) == before


def test_checkpoint_rewritten_during_disk_updates(server, ckpt, tmp_path):
    path = tmp_path / "rewritten"
    shutil.copytree(ckpt, path)
    f = path / "model.safetensors"
    data = f.read_bytes()
    _restore(server, ckpt)
    before = _greedy(server)
    stop = threading.Event()

    def trainer() -> None:  # re-saves in place, as torch.save / save_pretrained do
        while not stop.is_set():
            with open(f, "r+b") as out:
                out.truncate(0)
                for i in range(0, len(data), 1 << 15):
                    out.write(data[i:i + (1 << 15)])
                    out.flush()

    writer = threading.Thread(target=trainer, daemon=True)
    writer.start()
    statuses = []
    try:
        for _ in range(15):
            r = server.post("/update_weights_from_disk", json={"model_path": str(path)})
            statuses.append(r.status_code)
            assert r.status_code in (200, 400), r.text
            if r.status_code == 400:
                assert str(f) in r.json()["message"] and "Rolling back" in r.json()["message"], r.text
            assert _greedy(server) == before  # same values on disk: old or new, the output is the same
    finally:
        stop.set()
        writer.join()
    assert 400 in statuses, statuses
    assert server.get("/health").status_code == 200
    assert server.post("/update_weights_from_disk", json={"model_path": str(path)}).status_code == 200


def test_health_answers_while_an_update_waits_for_its_bytes(server, ckpt):
    # The engine answers nothing while it applies an update; /health asked it anyway and waited (a 684 MB
    # tensor update kept it waiting seconds). Here the update waits on the trainer for 3 s.
    from sync import WeightSender, init_custom_process_group, tcp_init_method

    port, box, name = free_port(), {}, f"slow-{server.mode}"  # a group name is taken for this process's life
    join = threading.Thread(target=lambda: box.setdefault("join", server.post("/init_weights_update_group", json={
        "master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2, "backend": "gloo",
        "group_name": name, "timeout": 30})))
    join.start()
    group = init_custom_process_group("gloo", tcp_init_method("127.0.0.1", port), 2, 0, name, timeout=30)
    join.join()
    assert box["join"].status_code == 200, box["join"].text
    named = list(iterate_checkpoint(ckpt))
    waits: list[float] = []

    def announce(meta) -> None:
        body = {"names": meta.names, "dtypes": meta.dtypes, "shapes": meta.shapes, "group_name": name,
                "load_format": "flattened_bucket", "weight_version": "slow"}
        post = threading.Thread(target=lambda: box.setdefault("update", server.post(
            "/update_weights_from_distributed", json=body)))
        post.start()
        box["post"] = post
        end = time.monotonic() + 3.0  # the bytes go out when this returns
        while time.monotonic() < end:
            start = time.monotonic()
            assert server.get("/health").status_code == 200
            waits.append(time.monotonic() - start)
            time.sleep(0.05)

    try:
        WeightSender(group, bucket_bytes=1 << 30).send_buckets(named, on_bucket=announce)
        box["post"].join(60)
        assert box["update"].status_code == 200, box["update"].text
        assert len(waits) > 10 and max(waits) < 1.0, waits
        assert server.get("/get_server_info").json()["weight_version"] == "slow"
    finally:
        server.post("/destroy_weights_update_group", json={"group_name": name})
    _restore(server, ckpt)


def test_join_to_nobody_does_not_stall_generation(server):
    port = free_port()
    box: dict = {}

    def join() -> None:
        start = time.monotonic()
        box["r"] = server.post("/init_weights_update_group", json={
            "master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
            "backend": "gloo", "group_name": "nobody", "timeout": 5})
        box["s"] = time.monotonic() - start

    t = threading.Thread(target=join)
    t.start()
    time.sleep(0.5)
    latencies = []
    while t.is_alive():
        start = time.monotonic()
        _greedy(server)
        latencies.append(time.monotonic() - start)
    t.join()
    assert len(latencies) >= 3 and max(latencies) < 1.0, latencies
    assert box["r"].status_code == 400 and f"127.0.0.1:{port}" in box["r"].json()["message"], box["r"].text
    assert 4.0 < box["s"] < 15, box["s"]


def _engine_pid(s: ServerProcess) -> int:
    return s.get("/get_server_info").json()["internal_states"][0]["engine_pid"]


def test_engine_killed_server_says_why_and_exits(ckpt, tmp_path):
    server = ServerProcess(_flags(ckpt), log_path=str(tmp_path / "server.log")).start()
    try:
        pid = _engine_pid(server)
        box: dict = {}
        long = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}}
        t = threading.Thread(target=lambda: box.setdefault("r", server.post("/generate", json=long)))
        t.start()
        deadline = time.monotonic() + 60
        while server.get("/get_load").json()[0]["num_reqs"] < 1:  # kill it while the request runs
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        t.join(30)
        r = box["r"]
        assert r.status_code == 503 and r.json()["error"]["message"] == "The engine process was killed by SIGKILL."
        try:
            health = server.get("/health", timeout=5)
            assert health.status_code == 503 and "SIGKILL" in health.json()["error"]["message"]
        except requests.ConnectionError:
            pass  # already exited
        assert server.proc.wait(30) == 1, server.log()
        assert "killed by SIGKILL" in server.log()
    finally:
        server.stop()


@pytest.mark.slow
def test_sigterm_under_load_answers_everything(ckpt, tmp_path):
    # Two run at a time, so most of the 16 wait in the queue when the signal comes (the tiny model's
    # context is 256 tokens: a running request ends within a second or so on a quiet machine).
    server = ServerProcess(_flags(ckpt, "--max-running-requests", "2"), log_path=str(tmp_path / "server.log")).start()
    results: list = []
    aborts: list[bool] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        body = {"input_ids": PROMPT + [i], "stream": i % 2 == 1,
                "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}
        try:
            r = requests.post(server.url + "/generate", json=body, timeout=60)
            # Answered: a whole JSON body, or a stream that ends with [DONE]. A request that finished before
            # the signal ends by length; the ones still running when it came end by abort.
            ok = r.status_code == 200 and (not body["stream"] or r.text.endswith("[DONE]\n\n"))
            aborted = '"abort"' in r.text
        except requests.RequestException as e:
            ok, aborted = e, False
        with lock:
            results.append(ok)
            aborts.append(aborted)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while True:  # signal once every request is in the engine
        load = server.get("/get_load").json()[0]
        if load["num_reqs"] + load["num_waiting_reqs"] >= 12 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    try:
        assert server.stop(signal.SIGTERM, timeout=60) == 0, server.log()
    finally:
        for t in threads:
            t.join(30)
        server.stop()
    assert results == [True] * 16, results
    assert any(aborts), "the signal came after every request had finished: nothing was in flight"
