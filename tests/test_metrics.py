"""GET /metrics with --enable-metrics on a real server (tiny random Llama, CPU): Prometheus text that
prometheus-client's own parser reads, SGLang's metric names, counters that add up to what the answers
said, latency histograms with one observation per request, the scheduler's gauges, and weight-update
metrics after a real update. Health checks and `log_metrics: false` requests stay out; bad requests
count for nothing and the server keeps serving.
"""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import ServerProcess, make_tiny_model_dir
from tests.server_checks import cpu_server, ok

PROMPT = "The quick brown fox jumps over the lazy dog. " * 4
GREEDY = {"temperature": 0.0, "max_new_tokens": 6, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama-metrics"), context_length=1024)


@pytest.fixture(scope="module")
def server(model_dir: str, tmp_path_factory: pytest.TempPathFactory):
    log = str(tmp_path_factory.mktemp("metrics-log") / "server.log")
    with cpu_server(model_dir, "--max-total-tokens", "8000", "--enable-metrics", log_path=log) as proc:
        yield proc


def scrape(server: ServerProcess) -> dict[str, float]:
    """Every sample of /metrics by name and labels (labels other than model_name shown in the key)."""
    resp = server.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            labels = {k: v for k, v in s.labels.items() if k != "model_name"}
            key = s.name + ("" if not labels else str(sorted(labels.items())))
            samples[key] = s.value
    return samples


def test_metrics_follow_the_requests(server):
    before = scrape(server)
    for name in ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage", "sglang:cache_hit_rate",
                 "sglang:gen_throughput", "sglang:prompt_tokens_total", "sglang:generation_tokens_total",
                 "sglang:time_to_first_token_seconds_count", "sglang:inter_token_latency_seconds_count",
                 "sglang:e2e_request_latency_seconds_count", "rollout:weight_updates_total",
                 "rollout:weight_update_seconds_count", "rollout:weight_update_bytes_total"):
        assert name in before, name
    assert before["sglang:prompt_tokens_total"] == 0 and before["sglang:num_running_reqs"] == 0
    assert before["rollout:weight_version[('weight_version', 'default')]"] == 1

    answers = [ok(server.post("/generate", json={"text": PROMPT, "sampling_params": GREEDY})) for _ in range(3)]
    stream = server.post("/generate", json={"text": PROMPT + "!", "sampling_params": GREEDY, "stream": True})
    assert stream.status_code == 200 and stream.text.endswith("data: [DONE]\n\n")
    batch = ok(server.post("/generate", json={"text": [PROMPT, "Hello"], "sampling_params": {**GREEDY, "n": 2}}))
    counted = answers + batch
    # Not counted: health checks, log_metrics false, bad requests.
    assert server.get("/health_generate").status_code == 200
    ok(server.post("/generate", json={"text": "quiet", "log_metrics": False, "sampling_params": GREEDY}))
    assert server.post("/generate", json={"text": PROMPT, "sampling_params": {"top_p": 7}}).status_code == 400
    time.sleep(1.1)  # past the rate window
    after = scrape(server)

    num = len(counted) + 1  # + the stream
    stream_prompt = len(ok(server.post("/tokenize", json={"prompt": PROMPT + "!"}))["tokens"])
    assert after["sglang:prompt_tokens_total"] == sum(a["meta_info"]["prompt_tokens"] for a in counted) + stream_prompt
    assert after["sglang:generation_tokens_total"] == GREEDY["max_new_tokens"] * num
    assert after["sglang:num_requests_total"] == num
    for hist in ("sglang:time_to_first_token_seconds", "sglang:e2e_request_latency_seconds",
                 "sglang:inter_token_latency_seconds"):
        assert after[hist + "_count"] == num, hist
        assert after[hist + "_sum"] > 0
    e2e_max = max(a["meta_info"]["e2e_latency"] for a in counted)
    assert after["sglang:time_to_first_token_seconds_sum"] < after["sglang:e2e_request_latency_seconds_sum"]
    assert after["sglang:e2e_request_latency_seconds_sum"] >= 0.5 * e2e_max
    cached = sum(a["meta_info"]["cached_tokens"] for a in counted)
    assert cached > 0 and cached <= after["sglang:cached_tokens_total"] <= cached + stream_prompt
    assert 0 < after["sglang:cache_hit_rate"] <= 1  # the repeated prompt was read from the cache
    assert after["sglang:gen_throughput"] > 0
    assert after["sglang:num_running_reqs"] == 0 and after["sglang:num_queue_reqs"] == 0
    assert after["sglang:token_usage"] == 0


def test_weight_update_metrics(server, model_dir):
    before = scrape(server)
    answer = ok(server.post("/update_weights_from_disk", json={"model_path": model_dir, "weight_version": "v2"}))
    assert answer["success"]
    failed = server.post("/update_weights_from_disk", json={"model_path": "/no/such/dir"})
    assert failed.status_code == 400
    after = scrape(server)
    assert after["rollout:weight_updates_total"] == before["rollout:weight_updates_total"] + 1
    assert after["rollout:weight_update_seconds_count"] == before["rollout:weight_update_seconds_count"] + 1
    assert after["rollout:weight_update_seconds_sum"] > before["rollout:weight_update_seconds_sum"]
    params = 49152 * 32 * 2 + 2 * (4 * 32 * 32 - 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32) + 32  # tiny Llama, fp32
    assert after["rollout:weight_update_bytes_total"] - before["rollout:weight_update_bytes_total"] == 4 * params
    assert after["rollout:weight_version[('weight_version', 'v2')]"] == 1
    assert ok(server.post("/generate", json={"text": PROMPT, "sampling_params": GREEDY}))["meta_info"][
        "weight_version"] == "v2"
