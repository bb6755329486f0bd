"""Behind sglang-router (SGLang's own router, the `sglang-router` package, Rust): two real servers on a tiny
random Llama, the router in front (cache_aware, as slime runs it). Generation through the router (text,
input_ids, n > 1, streaming), /flush_cache on every worker, the OpenAI routes through it, and RolloutClient
given the router: generation through it, a weight update from disk on both workers (greedy then equals
transformers on the new weights, on each worker), pause / continue and flush on each worker.
"""

from __future__ import annotations

import json

import openai
import pytest
import requests

from rollout import LocalRouter, RolloutClient
from tests.helpers import ServerProcess, make_tiny_model_dir
from tests.server_checks import ok
from tests.weight_trainer import hf_greedy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PROMPT = "The quick brown fox jumps over the lazy dog."
GREEDY = {"max_new_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return (make_tiny_model_dir(tmp_path_factory.mktemp("router-a"), context_length=1024, seed=0),
            make_tiny_model_dir(tmp_path_factory.mktemp("router-b"), context_length=1024, seed=1))


@pytest.fixture(scope="module")
def workers(model_dirs):
    servers = [ServerProcess(["--device", "cpu", "--dtype", "float32", "--model-path", model_dirs[0],
                              "--max-total-tokens", "8192", "--log-level", "warning"]).spawn() for _ in range(2)]
    try:
        for s in servers:
            s.wait_ready(300)
        yield servers
    finally:
        codes = [s.stop() for s in servers]
    assert codes == [0, 0], [s.log() for s in servers]


@pytest.fixture(scope="module")
def router(workers):
    with LocalRouter([w.url for w in workers]).start() as r:
        yield r


def post(url: str, body: dict, **kwargs) -> requests.Response:
    return requests.post(url, json=body, timeout=120, **kwargs)



def test_generate_through_router(router, workers):
    direct = ok(post(workers[0].url + "/generate", {"text": PROMPT, "sampling_params": GREEDY}))
    via = ok(post(router.url + "/generate", {"text": PROMPT, "sampling_params": GREEDY}))
    assert via["output_ids"] == direct["output_ids"] and via["text"] == direct["text"]
    ids = ok(post(router.url + "/generate", {"input_ids": [1, 2, 3, 4], "sampling_params": GREEDY}))
    assert len(ids["output_ids"]) == 8
    group = ok(post(router.url + "/generate", {"text": PROMPT, "sampling_params": {
        "max_new_tokens": 6, "temperature": 1.0, "n": 3, "sampling_seed": 5}, "return_logprob": True}))
    assert len(group) == 3 and len({tuple(g["output_ids"]) for g in group}) == 3
    assert all(len(g["meta_info"]["output_token_logprobs"]) == 6 for g in group)
    with requests.post(router.url + "/generate", json={"text": PROMPT, "sampling_params": GREEDY, "stream": True},
                       stream=True, timeout=120) as resp:
        assert resp.status_code == 200
        events = [line[len(b"data: "):] for line in resp.iter_lines() if line]
    assert events[-1] == b"[DONE]"
    assert json.loads(events[-2])["output_ids"] == direct["output_ids"]  # chunks are cumulative


def test_flush_cache_through_router(router):
    body = {"text": PROMPT * 4, "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
    ok(post(router.url + "/generate", body))
    again = ok(post(router.url + "/generate", body))  # cache_aware: the same worker, its cached prefix
    assert again["meta_info"]["cached_tokens"] > 0
    flushed = post(router.url + "/flush_cache", {})
    assert flushed.status_code == 200, flushed.text
    after = ok(post(router.url + "/generate", body))
    assert after["meta_info"]["cached_tokens"] == 0


def test_openai_routes_through_router(router):
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    want = ok(post(router.url + "/generate", {"text": PROMPT, "sampling_params": GREEDY}))
    got = client.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=0)
    assert got.choices[0].text == want["text"]
    messages = [{"role": "user", "content": "Name a colour."}]
    sync = client.chat.completions.create(model="m", messages=messages, max_tokens=6, temperature=0)
    stream = client.chat.completions.create(model="m", messages=messages, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == sync.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == sync.usage.completion_tokens
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=messages, temperature=-1)


def test_client_through_router(router, workers, model_dirs):
    with RolloutClient.from_router(router.url) as client:
        assert sorted(client.urls) == sorted(w.url for w in workers)
        assert client.router_urls == [router.url]
        assert all(client.health().values())
        before = client.generate([PROMPT], GREEDY)[0][0]
        assert before.server == router.url and before.weight_version == "default"

        client.pause_generation("in_place")
        client.continue_generation()
        replies = client.update_weights_from_disk(model_dirs[1], weight_version="v2")
        assert sorted(r.url for r in replies) == sorted(w.url for w in workers) and all(r.success for r in replies)
        assert [i["weight_version"] for i in client.model_info()] == ["v2", "v2"]

        prompt_ids = ok(post(workers[0].url + "/tokenize", {"prompt": PROMPT}))["tokens"]
        want = hf_greedy(model_dirs[1], prompt_ids, 8)
        groups = client.generate([prompt_ids] * 4, GREEDY)
        assert all(g[0].output_ids == want and g[0].weight_version == "v2" for g in groups)
        for w in workers:  # whichever worker the router picks serves the new weights
            direct = ok(post(w.url + "/generate", {"input_ids": prompt_ids, "sampling_params": GREEDY}))
            assert direct["output_ids"] == want and direct["meta_info"]["weight_version"] == "v2"
        assert [r.success for r in client.flush_cache()] == [True, True]

    # the same through an explicit worker list
    with RolloutClient(router.url, workers=[w.url for w in workers]) as client:
        assert client.generate([prompt_ids], GREEDY)[0][0].output_ids == want
