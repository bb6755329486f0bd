"""RolloutClient / AsyncRolloutClient against two live tiny-model servers (one with an API key).

Both servers start once for the module; the restart test runs last because it stops and restarts server B.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import rollout
from rollout import (AsyncRolloutClient, BadRequestError, ConnectionFailedError, RequestTimeoutError,
                     RetryPolicy, RolloutClient, ServerError, UnauthorizedError)
from rollout.client.balancer import Balancer
from rollout.client.local_server import LocalServer
from rollout.client.server_connection import ServerConnection
from tests.helpers import make_tiny_model_dir

pytestmark = pytest.mark.timeout(240)

KEY = "secret-key"
SERVER_ARGS = dict(num_threads=1, max_total_tokens=8192, random_seed=0, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-client"))


@pytest.fixture(scope="module")
def servers(model_dir: str):
    a = LocalServer(model_dir, **SERVER_ARGS)
    b = LocalServer(model_dir, api_key=KEY, **SERVER_ARGS)
    try:
        for s in (a, b):  # both processes first, so their model loads overlap
            s.spawn()
        for s in (a, b):
            s.wait_until_ready(180)
        yield a, b
    finally:
        for s in (a, b):
            s.stop()


@pytest.fixture(scope="module")
def client(servers):
    a, b = servers
    with RolloutClient([a.url, b.url], api_key=KEY, timeout=60) as c:
        yield c


def test_generate_batch_in_order_with_typed_results(client: RolloutClient) -> None:
    prompts = [[1, 5, 9, 14, 20, 33], "The capital of France is", [7, 7, 7, 7, 7]]
    groups = client.generate(prompts, {"max_new_tokens": 6, "temperature": 1.0, "ignore_eos": True}, n=3,
                             return_logprob=True)
    assert len(groups) == 3
    for i, group in enumerate(groups):
        assert [r.sample_index for r in group] == [0, 1, 2]
        assert all(r.prompt_index == i for r in group)
        assert len({r.server for r in group}) == 1, "a prompt's n samples must share one server"
        for r in group:
            assert len(r.output_ids) == r.completion_tokens == 6
            assert r.finish_reason.type == "length" and r.finish_reason.length == 6
            assert len(r.output_logprobs) == 6 and all(lp <= 0 for lp in r.output_logprobs)
            assert r.output_weight_versions == ["default"] * 6 and r.weight_version == "default"
            assert isinstance(r.text, str)
        # The siblings reuse the prompt's KV: the prefix is prefilled once per group, not n times.
        assert max(r.cached_tokens for r in group) >= group[0].prompt_tokens - 1 > 0
    assert groups[1][0].prompt_tokens == len(client.aio.servers[0].session.post(
        client.urls[0] + "/tokenize", json={"prompt": prompts[1]}).json()["tokens"])


def test_per_prompt_sampling_params_and_seeds(client: RolloutClient) -> None:
    sps = [{"max_new_tokens": 3, "temperature": 0.0}, {"max_new_tokens": 5, "temperature": 0.0}]
    first = client.generate([[3, 4, 5], [3, 4, 5]], sps)
    assert [g[0].completion_tokens for g in first] == [3, 5]
    assert first[1][0].output_ids[:3] == first[0][0].output_ids  # greedy: same prefix whatever the server
    seeded = {"max_new_tokens": 8, "temperature": 1.0, "sampling_seed": 7}
    runs = [client.generate([[9, 8, 7]] * 4, seeded) for _ in range(2)]
    ids = [g[0].output_ids for run in runs for g in run]
    assert all(x == ids[0] for x in ids), "same seed, prompt and weights on either server: same tokens"


def test_least_outstanding_balancing_over_two_servers(client: RolloutClient) -> None:
    groups = client.generate([[10 + i, 11, 12] for i in range(8)], {"max_new_tokens": 4}, n=2)
    per_server: dict[str, int] = {}
    for g in groups:
        per_server[g[0].server] = per_server.get(g[0].server, 0) + 1
    assert sorted(per_server.values()) == [4, 4], per_server
    assert all(s.outstanding == 0 for s in client.aio.servers)


def test_balancer_prefers_the_less_loaded_and_up_server() -> None:
    a, b = ServerConnection("http://a"), ServerConnection("http://b")
    bal = Balancer([a, b])
    a.acquire(5)
    assert all(bal.acquire() is b for _ in range(5)) and b.outstanding == 5
    assert {bal.acquire().url, bal.acquire().url} == {"http://a", "http://b"}  # 6 and 6
    heavy = bal.acquire(3)
    assert bal.acquire(1) is not heavy and sorted([a.outstanding, b.outstanding]) == [7, 9]
    a.release(a.outstanding), b.release(b.outstanding)
    b.mark_down(60)
    assert all(bal.acquire() is a for _ in range(3)), "a down server is skipped while another is up"


def test_concurrency_limit(servers) -> None:
    a, _ = servers
    peak = 0
    with RolloutClient([a.url], max_concurrency=2) as c:
        conn = c.aio.servers[0]
        done = threading.Event()

        def watch() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, conn.outstanding)
                time.sleep(0.001)

        t = threading.Thread(target=watch)
        t.start()
        try:
            groups = c.generate([[i + 1, 2, 3] for i in range(6)], {"max_new_tokens": 40, "ignore_eos": True})
        finally:
            done.set()
            t.join()
    assert len(groups) == 6 and peak == 2


def test_errors_are_typed_with_the_servers_message(servers, client: RolloutClient) -> None:
    with pytest.raises(BadRequestError) as err:
        client.generate([[1, 2]], {"temperature": -1})
    assert err.value.status == 400 and err.value.message == "temperature must be a non-negative finite number, got -1.0."
    with pytest.raises(BadRequestError, match="unknown|Unknown"):
        client.generate([[1, 2]], {"temprature": 1.0})
    with pytest.raises(BadRequestError, match="input_ids cannot be empty"):
        client.generate([[]])
    a, b = servers
    with RolloutClient([b.url]) as no_key:
        with pytest.raises(UnauthorizedError) as err:
            no_key.generate([[1, 2]])
        assert err.value.status == 401 and "API key" in err.value.message
        assert no_key.health() == {b.url: True}  # /health needs no key
    with RolloutClient([a.url]) as c:  # an unknown route: a ServerError with the status, not a crash
        with pytest.raises(ServerError) as err:
            c._run(c.aio._call(c.aio.servers[0], "POST", "/no_such_route", {}))
        assert err.value.status == 404
    with pytest.raises(TypeError, match="batch"):
        client.generate([1, 2, 3])


def test_timeout_closes_the_request_and_the_server_aborts_it(servers) -> None:
    a, _ = servers
    with RolloutClient([a.url], retry=RetryPolicy(retries=0)) as c:
        start = time.monotonic()
        with pytest.raises(RequestTimeoutError):
            c.generate([[1, 2, 3]], {"max_new_tokens": 3000, "ignore_eos": True}, timeout=0.5)
        assert time.monotonic() - start < 5
        deadline = time.monotonic() + 10
        while c.server_info()[0]["internal_states"][0]["num_engine_reqs"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.server_info()[0]["internal_states"][0]["num_engine_reqs"] == 0, "the timed-out request still runs"


def test_abort_by_rid_with_the_async_client(servers) -> None:
    a, _ = servers

    async def run() -> list:
        async with AsyncRolloutClient([a.url]) as c:
            task = asyncio.ensure_future(c.generate([[5, 6, 7], [8, 9, 10]], {"max_new_tokens": 3000,
                                                                              "ignore_eos": True}, n=2, rid="job42"))
            deadline = time.monotonic() + 20
            while (await c.server_info())[0]["internal_states"][0]["num_running_reqs"] < 4:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            await c.abort("job42")
            return await task

    groups = asyncio.run(run())
    assert [[r.rid for r in g] for g in groups] == [["job42_0_0", "job42_0_1"], ["job42_1_0", "job42_1_1"]]
    assert all(r.aborted and 0 < r.completion_tokens < 3000 for g in groups for r in g)


def test_flush_cache_health_info_and_progress(client: RolloutClient, capsys: pytest.CaptureFixture) -> None:
    assert all(client.health().values())
    client.wait_until_ready(10)
    replies = client.flush_cache(timeout=5)
    assert [r.success for r in replies] == [True, True] and "Cache flushed" in replies[0].message
    assert [i["weight_version"] for i in client.model_info()] == ["default", "default"]
    client.generate([[1, 2]] * 5, {"max_new_tokens": 1}, progress=True)
    assert "generate: 100%" in capsys.readouterr().err


def test_launch_server_context_manager(model_dir: str) -> None:
    with pytest.raises(RuntimeError, match="not a local Hugging Face model directory"):
        rollout.launch_server(model_dir + "/missing", timeout=60, device="cpu", dtype="float32")


def test_retries_ride_out_a_server_restart(servers) -> None:
    """Server B goes down: idempotent calls fail over to A or retry until B is back; non-idempotent calls
    are not retried."""
    a, b = servers
    b.stop()
    with RolloutClient([b.url], api_key=KEY, retry=RetryPolicy(retries=0)) as only_b:
        t0 = time.monotonic()
        with pytest.raises(ConnectionFailedError) as err:
            only_b.abort()  # changes state: never retried
        assert err.value.attempts == 1 and time.monotonic() - t0 < 2
    with RolloutClient([a.url, b.url], api_key=KEY) as both:  # fails over to A
        groups = both.generate([[4, 5, 6]] * 4, {"max_new_tokens": 2})
        assert {g[0].server for g in groups} == {a.url}
    patient = RetryPolicy(retries=30, backoff_s=0.5, max_backoff_s=2.0)
    with RolloutClient([b.url], api_key=KEY, retry=patient) as only_b:
        restarted = threading.Timer(1.0, b.start)
        restarted.start()
        try:
            groups = only_b.generate([[4, 5, 6]], {"max_new_tokens": 2})
        finally:
            restarted.join()
        assert groups[0][0].completion_tokens == 2 and groups[0][0].server == b.url
