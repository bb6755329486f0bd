"""--api-key and --admin-api-key (issue 11, item 10), SGLang's split: with an admin key, the control routes
(weight updates, pause, memory, cache, versions) take only it and generation only the normal key; with
only an admin key, generation is open and control locked. /health is always open."""

from __future__ import annotations

import pytest
import requests

from tests.helpers import ServerProcess, make_tiny_model_dir

KEY, ADMIN = "normal-key", "admin-key"
GENERATE = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2, "ignore_eos": True}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-auth"), context_length=512)


@pytest.fixture(scope="module")
def servers(model_dir: str, tmp_path_factory: pytest.TempPathFactory):
    """One server per test, both started at once so their loads overlap: "both_keys" (--api-key and
    --admin-api-key) and "admin_only" (--admin-api-key)."""
    logs = tmp_path_factory.mktemp("auth-logs")
    common = ["--device", "cpu", "--dtype", "float32", "--model-path", model_dir, "--log-level", "warning",
              "--skip-tokenizer-init"]
    procs = {"both_keys": ServerProcess([*common, "--api-key", KEY, "--admin-api-key", ADMIN],
                                        log_path=str(logs / "both_keys.log")),
             "admin_only": ServerProcess([*common, "--admin-api-key", ADMIN], log_path=str(logs / "admin_only.log"))}
    try:
        for proc in procs.values():
            proc.spawn()
        for proc in procs.values():
            proc.wait_until_ready(300)
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


def call(server: ServerProcess, method: str, path: str, key: str | None, body: dict | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.request(method, server.url + path, json=body, headers=headers, timeout=120)


def refused(resp: requests.Response, flag: str) -> None:
    assert resp.status_code == 401, (resp.status_code, resp.text)
    assert flag in resp.json()["error"]["message"]


CONTROL = [("POST", "/update_weight_version", {"new_version": "v-auth"}), ("POST", "/flush_cache", {}),
           ("POST", "/pause_generation", {"mode": "in_place"}), ("POST", "/continue_generation", {}),
           ("POST", "/get_weights_by_name", {"name": "model.norm.weight", "truncate_size": 2})]
NORMAL = [("POST", "/generate", GENERATE), ("GET", "/get_model_info", None), ("GET", "/get_server_info", None),
          ("GET", "/health_generate", None), ("POST", "/abort_request", {})]


def test_both_keys_split_control_from_generation(servers):
    server = servers["both_keys"]
    assert call(server, "GET", "/health", None).status_code == 200
    for method, path, body in NORMAL:
        refused(call(server, method, path, None, body), "--api-key")
        refused(call(server, method, path, ADMIN, body), "--api-key")  # the admin key is not the normal one
        assert call(server, method, path, KEY, body).status_code == 200, path
    for method, path, body in CONTROL:
        refused(call(server, method, path, None, body), "--admin-api-key")
        refused(call(server, method, path, KEY, body), "--admin-api-key")  # SGLang: only the admin key
        resp = call(server, method, path, ADMIN, body)
        assert resp.status_code == 200, (path, resp.text)
    assert call(server, "GET", "/get_model_info", KEY).json()["weight_version"] == "v-auth"
    info = call(server, "GET", "/get_server_info", KEY).json()
    assert info["api_key"] == "<hidden>" and info["admin_api_key"] == "<hidden>"
    out = call(server, "POST", "/generate", KEY, GENERATE)
    assert out.status_code == 200 and out.json()["meta_info"]["completion_tokens"] == 2


def test_admin_key_alone_locks_control_and_leaves_generation_open(servers):
    server = servers["admin_only"]
    for method, path, body in NORMAL:
        assert call(server, method, path, None, body).status_code == 200, path
    # Many token ids (checked on a thread, no tokenizer here): a prompt past the context is a 400.
    long = call(server, "POST", "/generate", None, {"input_ids": [5] * 20000})
    assert long.status_code == 400 and "longer than the model's context length" in long.json()["error"]["message"]
    for method, path, body in CONTROL:
        refused(call(server, method, path, None, body), "--admin-api-key")
        refused(call(server, method, path, "wrong", body), "--admin-api-key")
        assert call(server, method, path, ADMIN, body).status_code == 200, path
