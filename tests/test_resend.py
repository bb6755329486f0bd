"""The client's resend-at-most-once (RetryPolicy), on real single-thread servers of a tiny random Llama
(four, started once; the tests kill three in all and restart none): a request lost with its server (SIGKILLed mid-request) is resent once to another server, so no
prompt is lost and none is answered twice (the survivors' own request counters are the oracle); a request
lost a second time reaches the caller as an error, not a second resend, while a third server stood idle.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from typing import Any

import pytest
import requests

from rollout import ConnectionFailedError, LocalServer, RetryPolicy, RolloutClient
from tests.helpers import make_tiny_model_dir

pytestmark = pytest.mark.timeout(240)

SERVER_ARGS = dict(num_threads=1, max_total_tokens=16384, device="cpu", dtype="float32", log_level="warning",
                   enable_metrics=True)
LONG = {"max_new_tokens": 3000, "temperature": 1.0, "ignore_eos": True}  # seconds on the tiny model


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory):
    model = make_tiny_model_dir(tmp_path_factory.mktemp("tiny-resend"), context_length=4096)
    four = [LocalServer(model, **SERVER_ARGS) for _ in range(4)]
    try:
        for s in four:  # all processes first, so their model loads overlap
            s.spawn()
        for s in four:
            s.wait_until_ready(300)
        yield four
    finally:
        for s in four:
            s.stop()


def live(servers: list[LocalServer]) -> list[LocalServer]:
    return [s for s in servers if s.running]


def metric(url: str, name: str) -> float:
    text = requests.get(url + "/metrics", timeout=30).text
    return float(re.search(rf"^sglang:{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.M).group(1))


def wait_running(servers: list[LocalServer], busy: threading.Thread, timeout: float = 60.0) -> LocalServer:
    """The first server seen running a request."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and busy.is_alive():
        for s in servers:
            if s.running and metric(s.url, "num_running_reqs") > 0:
                return s
        time.sleep(0.05)
    raise AssertionError("no server ran the request (or the call ended first)")


def in_thread(fn: Any) -> tuple[threading.Thread, list]:
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(fn())
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_requests_lost_with_their_server_are_resent_once_and_answered_once(servers) -> None:
    pair = live(servers)[-2:]  # whichever test runs first, the other still finds the servers it needs
    assert len(pair) == 2
    finished = {s.url: metric(s.url, "num_requests_total") for s in pair}
    params = {"max_new_tokens": 300, "temperature": 1.0, "ignore_eos": True}
    with RolloutClient([s.url for s in pair], timeout=120, retry=RetryPolicy(backoff_s=0.1)) as client:
        prompts = [[10 + i, 20 + i, 30 + i] for i in range(12)]
        rollout, outcome = in_thread(lambda: client.generate(prompts, params))
        victim = wait_running(pair, rollout)
        os.kill(victim.proc.pid, signal.SIGKILL)
        rollout.join(180)
        groups = outcome[0]
        assert not isinstance(groups, BaseException), groups
        assert [len(g) for g in groups] == [1] * 12 and all(g[0].completion_tokens == 300 for g in groups)
        survivors = [s for s in pair if s is not victim]
        served = {s.url: sum(g[0].server == s.url for g in groups) for s in survivors}
        ran = {s.url: metric(s.url, "num_requests_total") - finished[s.url] for s in survivors}
        assert ran == served  # each prompt ran to the end once on the survivors: none was answered twice
        # The balancer gave each server 6 of the 12; those the victim had not answered were resent, once each.
        unanswered = 6 - sum(g[0].server == victim.url for g in groups)
        assert 1 <= client.resends <= unanswered, (client.resends, unanswered)


def test_a_second_loss_is_an_error_not_a_second_resend(servers) -> None:
    trio = live(servers)[:3]
    assert len(trio) == 3
    finished = {s.url: metric(s.url, "num_requests_total") for s in trio}
    with RolloutClient([s.url for s in trio], timeout=120, retry=RetryPolicy(retries=5, backoff_s=0.1)) as client:
        call, outcome = in_thread(lambda: client.generate([[5, 6, 7]], LONG))
        first = wait_running(trio, call)
        os.kill(first.proc.pid, signal.SIGKILL)
        second = wait_running([s for s in trio if s is not first], call)  # the resend, on another server
        os.kill(second.proc.pid, signal.SIGKILL)
        call.join(60)
        assert not call.is_alive()
        error = outcome[0]
        assert isinstance(error, ConnectionFailedError) and error.sent, error
        assert second.url in str(error) and client.resends == 1
        idle = next(s for s in trio if s not in (first, second))
        assert metric(idle.url, "num_requests_total") == finished[idle.url]  # no third attempt reached it
        assert metric(idle.url, "num_running_reqs") == 0
