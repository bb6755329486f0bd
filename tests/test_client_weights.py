"""Weight updates through the client on two live tiny servers (one receiving broadcasts directly into its
weights, one buffered): from disk, by one broadcast to both and as tensors over HTTP, with verification,
versions (per token too), refused updates surfaced with the servers' messages, and a refused bucket after
accepted ones leaving the servers paused rather than serving a mix."""

from __future__ import annotations

import pytest

from rollout import RolloutClient, WeightUpdateError
from rollout.client.local_server import LocalServer
from sync import iterate_checkpoint
from tests.helpers import make_tiny_model_dir

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    d0 = make_tiny_model_dir(tmp_path_factory.mktemp("w0"), seed=0)
    d1 = make_tiny_model_dir(tmp_path_factory.mktemp("w1"), seed=1)
    # One server receives broadcasts straight into its weights, the other into a buffer first.
    servers = [LocalServer(d0, num_threads=1, device="cpu", dtype="float32", weight_update_receive=mode).spawn()
               for mode in ("direct", "buffered")]
    try:
        for s in servers:
            s.wait_until_ready(180)
        with RolloutClient([s.url for s in servers]) as c:
            yield c, d0, d1
    finally:
        for s in servers:
            s.stop()


def test_update_from_disk_on_every_server(setup) -> None:
    c, d0, d1 = setup
    replies = c.update_weights_from_disk(d1, weight_version="disk-1", verify=True)
    assert [r.message for r in replies] == ["Succeeded to update model weights."] * 2
    assert [i["weight_version"] for i in c.model_info()] == ["disk-1", "disk-1"]
    with pytest.raises(WeightUpdateError, match="repository not found") as err:
        c.update_weights_from_disk("/nonexistent/checkpoint")
    assert len(err.value.results) == 2 and not any(r.success for r in err.value.results)
    assert [i["weight_version"] for i in c.model_info()] == ["disk-1", "disk-1"]  # unchanged


def test_one_broadcast_updates_both_servers(setup) -> None:
    c, d0, _ = setup
    group = c.init_weights_update_group(backend="gloo")
    assert group.world_size == 3
    try:
        named = [(n, t * 0.5) for n, t in iterate_checkpoint(d0)]
        replies = c.update_weights_from_distributed(group, named, weight_version="bc-1", verify=True,
                                                    bucket_bytes=200_000)  # several buckets
        assert all(r.success for r in replies)
        groups = c.generate([[1, 2, 3], [4, 5, 6]], {"max_new_tokens": 3}, n=2, return_logprob=True)
        assert {v for g in groups for r in g for v in r.output_weight_versions} == {"bc-1"}
        assert {g[0].server for g in groups} == set(c.urls)
        first = named[0]
        with pytest.raises(WeightUpdateError, match="max \\|difference\\|"):
            c.verify_weights([(first[0], first[1] + 1)])
        # A bucket refused after accepted ones (NaN in the last tensor): the servers stay paused.
        bad = [(n, t.clone()) for n, t in named]
        bad[-1][1].view(-1)[0] = float("nan")
        with pytest.raises(WeightUpdateError, match="hold a mix of old and new weights and stay paused"):
            c.update_weights_from_distributed(group, bad, weight_version="bc-2", bucket_bytes=200_000)
        assert all(i["internal_states"][0]["paused"] for i in c.server_info())
        c.update_weights_from_disk(d0, weight_version="disk-0", pause=None)
        c.continue_generation()
        assert c.generate([[7, 8]], {"max_new_tokens": 2})[0][0].completion_tokens == 2
    finally:
        c.destroy_weights_update_group(group)
    assert group.destroyed


def test_pause_and_continue(setup) -> None:
    c, _, _ = setup
    assert all(r.success for r in c.pause_generation("retract"))
    assert all(r.success for r in c.continue_generation())
    assert c.generate([[7, 8]], {"max_new_tokens": 2})[0][0].completion_tokens == 2


def test_update_from_tensor_in_buckets(setup) -> None:
    c, d0, d1 = setup
    named = [(n, t * 0.75) for n, t in iterate_checkpoint(d1)]
    replies = c.update_weights_from_tensor(named, weight_version="tensor-1", verify=True,
                                           bucket_bytes=200_000)  # several requests per server
    assert all(r.success for r in replies) and len(replies) == 2
    assert [i["weight_version"] for i in c.model_info()] == ["tensor-1", "tensor-1"]
    c.verify_weights(named)  # every server holds the new values, read back by name
    groups = c.generate([[1, 2, 3]], {"max_new_tokens": 3}, n=2, return_logprob=True)
    assert {v for g in groups for r in g for v in r.output_weight_versions} == {"tensor-1"}
    # A refused bucket after accepted ones: the servers stay paused (never serving the mix) until a good update.
    bad = [(n, t.clone()) for n, t in named]
    bad[-1][1].view(-1)[0] = float("nan")
    with pytest.raises(WeightUpdateError, match="non-finite") as err:
        c.update_weights_from_tensor(bad, weight_version="tensor-2", bucket_bytes=200_000)
    assert "hold a mix of old and new weights and stay paused" in str(err.value) and len(err.value.results) == 2
    assert all(i["internal_states"][0]["paused"] for i in c.server_info())
    c.update_weights_from_disk(d0, weight_version="disk-0", pause=None)
    c.continue_generation()
    assert c.generate([[7, 8]], {"max_new_tokens": 2})[0][0].completion_tokens == 2
    # Refused at its first bucket: nothing changed, generation continues.
    with pytest.raises(WeightUpdateError, match="does not match its digest|non-finite"):
        c.update_weights_from_tensor(bad[-1:], bucket_bytes=200_000)
    assert not any(i["internal_states"][0]["paused"] for i in c.server_info())
