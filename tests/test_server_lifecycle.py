"""The server's process life: --api-key, --skip-tokenizer-init, an engine that dies (503, not a hang),
clean exits on SIGTERM / SIGINT with no engine left behind, and no orphan when the server is killed.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import requests

from tests.helpers import ServerProcess, make_tiny_model_dir

KEY = "sekret-key"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama-lifecycle"), context_length=2048)


def engine_pid(server: ServerProcess) -> int:
    resp = server.get("/get_server_info", timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()["internal_states"][0]["engine_pid"]


def process_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            if state == "Z":  # exited; only its parent's reaping is left
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_api_key_skip_tokenizer_and_engine_death(model_dir, tmp_path):
    with ServerProcess(["--device", "cpu", "--dtype", "float32",
                        "--model-path", model_dir, "--skip-tokenizer-init", "--log-level", "warning"],
                       api_key=KEY, log_path=str(tmp_path / "server.log")) as server:
        url = server.url
        # --api-key: every route but /health needs the bearer token.
        assert requests.get(url + "/health", timeout=30).status_code == 200
        for method, path in (("POST", "/generate"), ("GET", "/get_model_info"), ("GET", "/get_server_info"),
                             ("GET", "/health_generate"), ("POST", "/flush_cache"), ("POST", "/abort_request")):
            resp = requests.request(method, url + path, json={"input_ids": [1, 2]}, timeout=30)
            assert resp.status_code == 401, (path, resp.status_code)
            assert "error" in resp.json()
        wrong = requests.post(url + "/generate", json={"input_ids": [1, 2]}, timeout=30,
                              headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert server.get("/get_model_info").status_code == 200
        assert server.get("/health_generate").status_code == 200

        # --skip-tokenizer-init: token ids only, no "text" anywhere.
        resp = server.post("/generate", json={"input_ids": [5, 6, 7], "return_logprob": True,
                                              "return_text_in_logprobs": True,
                                              "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}})
        assert resp.status_code == 200, resp.text
        out = resp.json()
        assert "text" not in out and len(out["output_ids"]) == 4
        assert all(e[2] is None for e in out["meta_info"]["output_token_logprobs"])
        chunks = server.post("/generate", json={"input_ids": [5, 6], "stream": True,
                                                "sampling_params": {"max_new_tokens": 3}}).text
        assert '"text"' not in chunks and chunks.endswith("data: [DONE]\n\n")
        for path, body in (("/generate", {"text": "hello"}),
                           ("/generate", {"input_ids": [5], "sampling_params": {"stop": ["x"]}}),
                           ("/tokenize", {"prompt": "hello"}),
                           ("/detokenize", {"tokens": [5]})):
            resp = server.post(path, json=body)
            assert resp.status_code == 400, (path, resp.text)
            assert "skip-tokenizer-init" in resp.json()["error"]["message"]

        # The engine dies under a running request: that request answers 503 naming the signal, fast, and the
        # server exits 1 by itself (for its supervisor to restart it; tests/test_faults.py checks /health).
        pid = engine_pid(server)
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("r", server.post(
            "/generate", json={"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}})))
        t.start()
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        t.join(30)
        assert not t.is_alive()
        assert box["r"].status_code == 503 and "killed by SIGKILL" in box["r"].json()["error"]["message"]
        assert server.proc.wait(30) == 1, server.log()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_exit_leaves_no_engine(model_dir, sig, tmp_path):
    server = ServerProcess(["--device", "cpu", "--dtype", "float32",
                            "--model-path", model_dir, "--log-level", "warning"],
                           log_path=str(tmp_path / "server.log")).start()
    try:
        pid = engine_pid(server)
        # A request in flight while the server goes down.
        box = {}

        def in_flight():
            try:
                box["r"] = requests.post(server.url + "/generate", timeout=60, json={
                    "input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}})
            except requests.RequestException as e:
                box["r"] = e

        client = threading.Thread(target=in_flight, daemon=True)
        client.start()
        time.sleep(0.5)
        started = time.monotonic()
        code = server.stop(sig, timeout=60)
        client.join(30)
        if sig == signal.SIGINT:
            assert code == 0, server.log()
            assert time.monotonic() - started < 15
            # The request in flight was answered with its partial output, not cut off.
            out = box["r"].json()
            assert out["meta_info"]["finish_reason"]["type"] == "abort"
            assert 0 < out["meta_info"]["completion_tokens"] < 2000
        assert process_gone(pid, timeout=20), f"engine process {pid} outlived the server"
    finally:
        server.stop()


def test_bad_model_path_exits_with_message(tmp_path):
    server = ServerProcess(["--device", "cpu", "--dtype", "float32",
                            "--model-path", str(tmp_path / "missing")], log_path=str(tmp_path / "server.log"))
    with pytest.raises(RuntimeError, match="not a local Hugging Face model directory"):
        server.start(timeout=120)


def test_engine_that_cannot_load_exits_1(model_dir, tmp_path):
    broken = tmp_path / "no-weights"
    broken.mkdir()
    for f in os.listdir(model_dir):
        if not f.endswith(".safetensors"):
            (broken / f).write_bytes(open(os.path.join(model_dir, f), "rb").read())
    server = ServerProcess(["--device", "cpu", "--dtype", "float32",
                            "--model-path", str(broken)], log_path=str(tmp_path / "server.log"))
    with pytest.raises(RuntimeError, match="exited with code 1"):
        server.start(timeout=120)
    assert "The engine failed" in server.log() and "safetensors" in server.log()
    server.stop()
