"""The HTTP front end's limits (issue 11, items 2, 4, 5, 9) against a real server on a tiny random Llama:
body size (413, by Content-Length and chunked), a body that stops arriving (408), deep JSON (400), long
texts refused by length, /health answering while a 10 MB input is tokenized, the queue bound (429 with
Retry-After), the cap on n, capped weight reads and version strings. After each, the server still serves.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import requests

from tests.helpers import ServerProcess, make_tiny_model_dir

CONTEXT = 1024
MAX_BODY = 16 << 20
MAX_QUEUED = 64
MAX_N = 16
READ_TIMEOUT_S = 2.0
SENTENCE = "The quick brown fox jumps over the lazy dog. "


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    model = make_tiny_model_dir(tmp_path_factory.mktemp("tiny-limits"), context_length=CONTEXT)
    log = str(tmp_path_factory.mktemp("limits-log") / "server.log")
    proc = ServerProcess(["--device", "cpu", "--dtype", "float32", "--model-path", model, "--log-level", "warning",
                          "--max-total-tokens", "20000", "--max-request-bytes", str(MAX_BODY),
                          "--max-queued-requests", str(MAX_QUEUED), "--max-n", str(MAX_N),
                          "--request-read-timeout", str(READ_TIMEOUT_S)], log_path=log)
    proc.start(timeout=300)
    yield proc
    code = proc.stop()
    assert code == 0, f"server exited with {code}:\n{proc.log()}"


def error_of(resp: requests.Response, status: int) -> str:
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    return resp.json()["error"]["message"]


def still_serves(server: ServerProcess) -> None:
    resp = server.post("/generate", json={"text": "Hello", "sampling_params": {"max_new_tokens": 3,
                                                                               "ignore_eos": True}})
    assert resp.status_code == 200, resp.text
    assert resp.json()["meta_info"]["completion_tokens"] == 3


def raw_exchange(server: ServerProcess, data: bytes, wait_s: float) -> tuple[bytes, float]:
    """Send raw bytes on a fresh connection; what came back until the server closed it, and when."""
    start = time.monotonic()
    with socket.create_connection((server.host, server.port), timeout=wait_s) as sock:
        sock.sendall(data)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except socket.timeout:
            pass
    return got, time.monotonic() - start


# --- item 2: body size ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/generate", "/abort_request", "/update_weight_version", "/tokenize",
                                  "/get_weights_by_name", "/no_such_route"])
def test_body_over_the_limit_is_413_by_content_length(server, path):
    body = b'{"text": "' + b"a" * MAX_BODY + b'"}'
    message = error_of(server.post(path, data=body), 413)
    assert "--max-request-bytes" in message and "16 MiB" in message
    still_serves(server)


def test_chunked_body_over_the_limit_is_413(server):
    def chunks():
        yield b'{"text": "'
        for _ in range(40):  # 20 MiB, no Content-Length
            yield b"a" * (512 << 10)
        yield b'"}'
    message = error_of(server.post("/generate", data=chunks()), 413)
    assert "--max-request-bytes" in message
    still_serves(server)


def test_body_shorter_than_its_content_length_times_out_408(server):
    head = (f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: 100\r\n\r\n").encode()
    got, took = raw_exchange(server, head + b'{"text": ', wait_s=READ_TIMEOUT_S + 20)
    assert got.startswith(b"HTTP/1.1 408"), got[:200]
    assert b"--request-read-timeout" in got
    assert READ_TIMEOUT_S * 0.9 <= took < READ_TIMEOUT_S + 15
    still_serves(server)


def test_garbage_request_line_is_answered_and_closed(server):
    # uvicorn (h11) answers a request line it cannot parse itself, before any route: a plain-text 400
    # (docs/api.md, "Limits").
    got, _ = raw_exchange(server, b"\x00\xffNOT HTTP AT ALL\r\n\r\n", wait_s=10)
    assert got.startswith(b"HTTP/1.1 400"), got[:200]
    assert got.endswith(b"Invalid HTTP request received."), got[-200:]
    still_serves(server)


# --- item 4: deep JSON --------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [100, 999, 100_000])
def test_deeply_nested_json_is_400(server, depth):
    for body in (b"[" * depth + b"]" * depth, b'{"text": ' + b"[" * depth + b"]" * depth + b"}",
                 b'{"sampling_params": {"stop": ' + b"[" * depth + b"]" * depth + b"}, \"text\": \"a\"}"):
        message = error_of(server.post("/generate", data=body), 400)
        assert "nested too deeply" in message
    still_serves(server)


# --- item 2: long inputs, the event loop ----------------------------------------------------------------


def test_text_longer_than_the_context_can_hold_is_refused_without_tokenizing(server):
    text = SENTENCE * ((9 << 20) // len(SENTENCE))  # 9 MB: under the body limit
    start = time.monotonic()
    message = error_of(server.post("/generate", json={"text": ["short", text]}), 400)
    assert time.monotonic() - start < 5.0  # tokenizing 9 MB takes far longer on this machine
    assert "text[1]" in message and "characters" in message and f"({CONTEXT} tokens)" in message
    still_serves(server)


def test_health_answers_while_a_10mb_input_is_tokenized(server):
    reps = (10 << 20) // len(SENTENCE)
    text = SENTENCE * reps
    # Token count of the repeated sentence grows by the same amount per repetition (no special tokens).
    count = [len(server.post("/tokenize", json={"prompt": SENTENCE * r, "add_special_tokens": False}).json()["tokens"])
             for r in (2, 3)]
    want = count[0] + (count[1] - count[0]) * (reps - 2)
    answer: dict = {}

    def big() -> None:
        start = time.monotonic()
        answer["resp"] = server.post("/tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=600)
        answer["took"] = time.monotonic() - start

    thread = threading.Thread(target=big)
    thread.start()
    latencies = []
    while thread.is_alive():
        start = time.monotonic()
        assert requests.get(server.url + "/health", timeout=600).status_code == 200
        latencies.append(time.monotonic() - start)
        time.sleep(0.02)
    thread.join()
    assert answer["resp"].status_code == 200
    assert answer["resp"].json()["count"] == want
    worst, median = max(latencies), sorted(latencies)[len(latencies) // 2]
    print(f"/health during a 10 MB /tokenize of {answer['took']:.1f} s: {len(latencies)} probes, median "
          f"{median * 1e3:.1f} ms, max {worst * 1e3:.1f} ms")
    # Tokenizing on the event loop held /health for the whole call (seconds: one or two probes, the
    # worst as long as the call). The goal is 50 ms; on 2 shared, busy cores allow scheduling noise.
    assert len(latencies) >= 10
    assert median < 0.1, median
    assert worst < min(2.0, 0.25 * answer["took"]), (worst, answer["took"])
    still_serves(server)


# --- item 9: back-pressure ---------------------------------------------------------------------------------


def test_n_above_the_cap_is_400(server):
    message = error_of(server.post("/generate", json={"text": "hi", "sampling_params": {"n": MAX_N + 1}}), 400)
    assert message == f"sampling_params.n must be at most {MAX_N} (--max-n), got {MAX_N + 1}."
    still_serves(server)


def test_full_queue_is_429_with_retry_after(server):
    assert server.post("/pause_generation", json={"mode": "in_place"}).json()["success"]
    waiting: dict = {}

    def fill() -> None:
        waiting["resp"] = server.post("/generate", json={
            "input_ids": [[5, 6, 7]] * (MAX_QUEUED // 2 + 8), "sampling_params": {"max_new_tokens": 2}})

    filler = threading.Thread(target=fill)
    filler.start()
    try:
        deadline = time.monotonic() + 30
        while server.get("/get_server_info").json()["internal_states"][0]["num_frontend_reqs"] < MAX_QUEUED // 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        resp = server.post("/generate", json={"input_ids": [[5, 6]] * (MAX_QUEUED // 2), "sampling_params": {}})
        message = error_of(resp, 429)
        assert resp.headers["Retry-After"] == "1"
        assert "--max-queued-requests" in message
        # The OpenAI routes answer the same 429 in OpenAI's error shape (it was a 500 there).
        resp = server.post("/v1/completions", json={"prompt": [[5, 6]] * (MAX_QUEUED // 2), "max_tokens": 1})
        assert resp.status_code == 429 and resp.headers["Retry-After"] == "1", (resp.status_code, resp.text[:500])
        error = resp.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == 429, error
        assert "--max-queued-requests" in error["message"], error
        # One call bigger than the whole queue can never fit: a 400, not a 429 to retry forever.
        message = error_of(server.post("/generate", json={"input_ids": [[1, 2]] * 5, "sampling_params": {
            "n": MAX_N, "max_new_tokens": 1}}), 400)
        assert "--max-queued-requests" in message
    finally:
        assert server.post("/continue_generation", json={}).json()["success"]
        filler.join()
    assert waiting["resp"].status_code == 200 and len(waiting["resp"].json()) == MAX_QUEUED // 2 + 8
    still_serves(server)


# --- item 5: small requests with huge answers ----------------------------------------------------------------


def test_weight_reads_are_capped(server):
    message = error_of(server.post("/get_weights_by_name", json={"name": "model.embed_tokens.weight",
                                                                "truncate_size": 10**9}), 400)
    assert message == "truncate_size must be at most 65536 (rows, or elements of a vector), got 1000000000."
    # 49152 x 32 values: more than one answer may carry; the engine says how many and what to do.
    message = error_of(server.post("/get_weights_by_name", json={"name": "model.embed_tokens.weight",
                                                                "truncate_size": 49152}), 400)
    assert "1572864 values of model.embed_tokens.weight" in message and "fewer rows" in message
    rows = server.post("/get_weights_by_name", json={"name": "model.embed_tokens.weight", "truncate_size": 3})
    assert rows.status_code == 200 and len(rows.json()) == 3 and len(rows.json()[0]) == 32
    still_serves(server)


def test_version_strings_are_capped(server):
    before = server.get("/get_model_info").json()["weight_version"]
    message = error_of(server.post("/update_weight_version", json={"new_version": "v" * (1 << 20)}), 400)
    assert message.startswith("new_version must be at most 256 characters, got 1048576")
    message = error_of(server.post("/update_weights_from_disk", json={"model_path": "/nonexistent",
                                                                      "weight_version": "w" * 257}), 400)
    assert message.startswith("weight_version must be at most 256 characters, got 257")
    assert server.get("/get_model_info").json()["weight_version"] == before
    ok = server.post("/update_weight_version", json={"new_version": "v" * 256})
    assert ok.status_code == 200 and server.get("/get_model_info").json()["weight_version"] == "v" * 256
    assert server.post("/update_weight_version", json={"new_version": before}).status_code == 200
    still_serves(server)
