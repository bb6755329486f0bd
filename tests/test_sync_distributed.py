"""Broadcast updates over gloo between real processes: a trainer (rank 0) and servers (ranks 1, 2).

Processes are spawned (torch.multiprocessing, 'spawn'); the pytest process takes part as one server so it
can apply what it receives to a real model; both servers receive with sync.ModelReceiver, as a server's
WeightUpdater does (one "direct", one "buffered"). Announcements that would travel over HTTP (names, dtypes,
shapes) travel over multiprocessing queues, msgspec-encoded. Module-level imports stay light (no
transformers) so each spawned child starts fast.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import traceback
from typing import Any

import msgspec
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sync import (BroadcastError, GroupJoinError, ModelReceiver, PartialUpdateError, UpdateReport, WeightSender,
                  WeightUpdateError, check_specs, destroy_process_group, init_custom_process_group,
                  iterate_checkpoint, model_checksums, named_checksums, tcp_init_method)
from sync.specs import TensorSpecs

pytestmark = pytest.mark.timeout(180)  # a hang is a failure, never a stuck CI job

GROUP = "weight_update_group"
TIMEOUT = 30.0        # group timeout (s): only reached when something is broken
WAIT = TIMEOUT + 15   # how long the test waits for a child's report
BUCKET_BYTES = 40_000  # the tiny model's embeddings (65 KB) get buckets of their own, small tensors share
BIG = 50_000_000       # elements (200 MB): a message that takes a while on the wire


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(port: int, world_size: int, rank: int, timeout: float = TIMEOUT) -> dist.ProcessGroup:
    return init_custom_process_group("gloo", tcp_init_method("127.0.0.1", port), world_size, rank, GROUP,
                                     timeout=timeout)


def _own_default_group(port: int) -> None:
    # A process's own default group (a trainer's data-parallel world, say): must stay as it was.
    dist.init_process_group("gloo", init_method=tcp_init_method("127.0.0.1", port), rank=0, world_size=1)


def _default_group_state() -> dict[str, Any]:
    t = torch.ones(1)
    dist.all_reduce(t)  # still usable
    return {"initialized": dist.is_initialized(), "rank": dist.get_rank(), "world": dist.get_world_size(),
            "sum": t.item()}


# --- spawned processes -------------------------------------------------------------------------------


def _trainer(port: int, default_port: int, ckpt: str, world_size: int, announce: list, results) -> None:
    try:
        _own_default_group(default_port)
        group = _join(port, world_size, 0)
        assert dist.get_world_size() == 1 and dist.get_world_size(group) == world_size
        named = list(iterate_checkpoint(ckpt))
        # Second update: new values, half of them bf16 (buckets per dtype; the server casts on copy).
        named2 = [(n, (t * 2).bfloat16() if i % 2 else t * 2) for i, (n, t) in enumerate(named)]
        named3 = [(n, t + 1) for n, t in named2]

        def tell(update: int, kind: str, specs: TensorSpecs) -> None:
            for q in announce:
                q.put((update, kind, msgspec.json.encode(specs)))

        sender = WeightSender(group, bucket_bytes=BUCKET_BYTES)
        sender.send_tensors(named, on_start=lambda specs: tell(0, "tensors", specs))
        metas = sender.send_buckets(named2, on_bucket=lambda meta: tell(1, "bucket", meta.specs()))
        mixed = WeightSender(group, bucket_bytes=BUCKET_BYTES, split_on_dtype=False)
        mixed_metas = mixed.send_buckets(named3, on_bucket=lambda meta: tell(2, "bucket", meta.specs()))
        tell(3, "done", TensorSpecs([], [], []))
        results.put(("trainer", {
            "fp32": [named_checksums(x, torch.float32) for x in (named, named2, named3)],
            "buckets": len(metas), "bucket_dtypes": sorted({m.buffer_dtype for m in metas}),
            "mixed_buffers": sorted({m.buffer_dtype for m in mixed_metas}),
        }))
        destroy_process_group(group)
        results.put(("trainer default group", _default_group_state()))
        dist.destroy_process_group()
    except BaseException:
        results.put(("trainer error", traceback.format_exc()))


def _model(path: str):
    from runtime.model_runner import ModelRunner
    from runtime.server_args import ServerArgs

    return ModelRunner(ServerArgs(model_path=path, max_total_tokens=512,
                                  device="cpu", dtype="float32"), progress=False).model


def _receive(receiver: ModelReceiver, group: dist.ProcessGroup, kind: str, specs: TensorSpecs) -> UpdateReport:
    """One announced request, as a server's WeightUpdater takes it: check the specs against the model, then
    receive; specs that do not fit are still received (and dropped) so the trainer is not left blocked."""
    try:
        targets = check_specs(receiver.model, specs)
    except WeightUpdateError:
        targets = None
    if kind == "tensors":
        return receiver.receive_tensors(group, specs, targets, "cpu")
    return receiver.receive_bucket(group, GROUP, specs, targets, "cpu")


def _receive_updates(group: dist.ProcessGroup, announce, on_update) -> None:
    """Serve announcements until 'done': each is all tensors of an update, or one bucket of it (the request
    carries names, dtypes, shapes only: the receiver rebuilds the bucket's layout from them)."""
    while True:
        update, kind, raw = announce.get(timeout=WAIT)
        if kind == "done":
            return
        on_update(update, kind, msgspec.json.decode(raw, type=TensorSpecs))


def _receiver(port: int, default_port: int, world_size: int, rank: int, model_path: str, announce,
              results) -> None:
    try:
        _own_default_group(default_port)
        receiver = ModelReceiver(_model(model_path), "buffered")
        group = _join(port, world_size, rank)
        got: dict[int, dict[str, int]] = {}

        def on_update(update: int, kind: str, specs: TensorSpecs) -> None:
            _receive(receiver, group, kind, specs)
            got[update] = model_checksums(receiver.model)

        _receive_updates(group, announce, on_update)
        destroy_process_group(group)
        results.put((f"receiver {rank}", {"fp32": [got[u] for u in sorted(got)], "default": _default_group_state()}))
        dist.destroy_process_group()
    except BaseException:
        results.put((f"receiver {rank} error", traceback.format_exc()))


def _join_like_sglang_trainers(port: int, world_size: int, rank: int) -> dist.ProcessGroup:
    """How OpenRLHF / slime / verl trainers build the group (API.md): tcp:// rendezvous (rank 0 hosts the
    store and waits for the others), a store prefixed by the group name, a non-default group on it."""
    from datetime import timedelta

    from torch.distributed.distributed_c10d import _new_process_group_helper, _world

    timeout = timedelta(seconds=TIMEOUT)
    store, rank, world_size = next(dist.rendezvous(f"tcp://127.0.0.1:{port}", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    group, _ = _new_process_group_helper(world_size, rank, [], "gloo", dist.PrefixStore(GROUP, store),
                                         group_name=GROUP, timeout=timeout)
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def _dying_trainer(port: int, ckpt: str, announce, mode: str, die_after: int) -> None:
    """Joins as a third-party trainer would, announces everything, sends `die_after` tensors or buckets,
    then is SIGKILLed."""
    group = _join_like_sglang_trainers(port, 2, 0)
    named = list(iterate_checkpoint(ckpt))
    if mode == "mid-message":  # dies while one large message is on the wire
        big = torch.ones(BIG)
        announce.put(msgspec.json.encode(TensorSpecs.of([("model.embed_tokens.weight", big)])))
        threading.Timer(0.02, os.kill, (os.getpid(), signal.SIGKILL)).start()
        dist.broadcast(big, 0, group=group)
    elif mode == "tensors":
        announce.put(msgspec.json.encode(TensorSpecs.of(named)))
        for i, (_, tensor) in enumerate(named):
            if i == die_after:
                os.kill(os.getpid(), signal.SIGKILL)
            dist.broadcast(tensor, 0, group=group)  # what an OpenRLHF-style trainer calls directly
    else:
        sender = WeightSender(group, bucket_bytes=BUCKET_BYTES)
        metas = sender.plan(named)
        announce.put(msgspec.json.encode([m.specs() for m in metas]))
        sent = {"n": 0}

        def maybe_die(meta) -> None:
            if sent["n"] == die_after:
                os.kill(os.getpid(), signal.SIGKILL)
            sent["n"] += 1

        sender.send_buckets(named, on_bucket=maybe_die)
    time.sleep(WAIT)  # not reached


# --- tests -------------------------------------------------------------------------------------------


def _collect(results, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for _ in range(n):
        key, value = results.get(timeout=WAIT)
        assert "error" not in key, f"{key}:\n{value}"
        out[key] = value
    return out


def _stop(procs) -> None:
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join()


def test_trainer_broadcasts_to_two_servers(tiny_model_dir) -> None:
    """World size 3: trainer (child, own default group), server 1 (child, own default group, buffered
    receive), server 2 (us, no default group, direct receive). Per tensor, typed buckets and mixed-dtype
    buckets; servers end equal to the trainer."""
    ckpt = tiny_model_dir("llama", seed=1)
    base = tiny_model_dir("llama")
    model = _model(base)
    ptrs = [p.data_ptr() for p in model.parameters()]
    ctx = mp.get_context("spawn")
    ann_child, ann_us, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_trainer, args=(port, _free_port(), ckpt, 3, [ann_child, ann_us], results)),
             ctx.Process(target=_receiver, args=(port, _free_port(), 3, 1, base, ann_child, results))]
    for p in procs:
        p.start()
    try:
        assert not dist.is_initialized()
        group = _join(port, 3, 2)
        assert not dist.is_initialized(), "joining the weight group must not create a default group"
        assert group.size() == 3 and group.rank() == 2
        receiver = ModelReceiver(model, "direct")
        applied: dict[int, list[str]] = {}
        checksums: dict[int, dict[str, int]] = {}

        def on_update(update: int, kind: str, specs: TensorSpecs) -> None:
            # Per tensor (update 0) or bucket by bucket (updates 1, 2): one request each, as over HTTP.
            applied.setdefault(update, []).extend(_receive(receiver, group, kind, specs).names)
            checksums[update] = model_checksums(model)

        _receive_updates(group, ann_us, on_update)
        destroy_process_group(group)
        assert not dist.is_initialized()

        got = _collect(results, 3)
    finally:
        _stop(procs)

    trainer = got["trainer"]
    assert trainer["buckets"] > 2 and trainer["bucket_dtypes"] == ["bfloat16", "float32"]
    assert "uint8" in trainer["mixed_buffers"]
    # Server 2 (here): the model holds exactly the trainer's tensors after each update (in fp32).
    assert checksums == dict(enumerate(trainer["fp32"]))
    names = model.hf_weight_names()
    assert all(sorted(applied[u]) == sorted(names) for u in range(3))
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    # Server 1 (child): the same, received buffered (bf16 -> fp32 is exact, so this is bit for bit).
    assert got["receiver 1"]["fp32"] == trainer["fp32"]
    # Both children's own default groups are untouched.
    for state in (got["trainer default group"], got["receiver 1"]["default"]):
        assert state == {"initialized": True, "rank": 0, "world": 1, "sum": 1.0}


def test_server_fails_fast_when_the_trainer_never_comes() -> None:
    port = _free_port()
    start = time.monotonic()
    with pytest.raises(GroupJoinError) as err:
        _join(port, 2, 1, timeout=2)
    elapsed = time.monotonic() - start
    assert elapsed < 3, elapsed  # the timeout, not twice it (TCPStore's own client retries that long)
    assert f"127.0.0.1:{port}" in str(err.value) and GROUP in str(err.value)
    # Nothing half-registered: the name is free for the next attempt.
    from torch.distributed.distributed_c10d import _world
    assert GROUP not in _world.pg_names.values()


def test_trainer_fails_fast_when_a_server_never_comes() -> None:
    port = _free_port()
    start = time.monotonic()
    with pytest.raises(GroupJoinError, match=f"127.0.0.1:{port}"):
        _join(port, 2, 0, timeout=2)
    assert time.monotonic() - start < 3


@pytest.mark.parametrize("mode, receive", [("tensors", "buffered"), ("tensors", "direct"), ("buckets", "buffered"),
                                           ("mid-message", "buffered")])
def test_trainer_killed_mid_broadcast(tiny_model_dir, mode, receive) -> None:
    """The server raises long before the group timeout. A buffered request leaves the model untouched
    (BroadcastError); buckets applied before the one that broke stay applied (each is its own request); a
    direct receive reports the mix (PartialUpdateError).

    The trainer here joins and sends the way third-party trainer code does (not through sync/)."""
    ckpt = tiny_model_dir("llama", seed=1)
    model = _model(tiny_model_dir("llama"))
    receiver = ModelReceiver(model, receive)
    before = model_checksums(model)
    ctx = mp.get_context("spawn")
    announce = ctx.Queue()
    port = _free_port()
    proc = ctx.Process(target=_dying_trainer, args=(port, ckpt, announce, mode, 3))
    proc.start()
    try:
        group = _join(port, 2, 1, timeout=60)  # a generous timeout: the failure must not wait for it
        raw = announce.get(timeout=WAIT)
        if mode == "buckets":
            requests = [("bucket", s) for s in msgspec.json.decode(raw, type=list[TensorSpecs])]
            assert len(requests) > 4
        else:
            requests = [("tensors", msgspec.json.decode(raw, type=TensorSpecs))]
        applied: list[str] = []
        start = time.monotonic()
        with pytest.raises(PartialUpdateError if receive == "direct" else BroadcastError) as err:
            for kind, specs in requests:
                _receive(receiver, group, kind, specs)
                applied += specs.names
        elapsed = time.monotonic() - start
        assert elapsed < 10, elapsed  # the group timeout is 60 s
        assert GROUP in str(err.value) and ("tensor" in str(err.value) or "bucket" in str(err.value))
        if receive == "direct":
            assert "directly" in str(err.value)
        else:
            new = named_checksums(iterate_checkpoint(ckpt))
            assert len(applied) == (sum(len(s.names) for _, s in requests[:3]) if mode == "buckets" else 0)
            assert model_checksums(model) == {n: new[n] if n in applied else c for n, c in before.items()}
        destroy_process_group(group)
    finally:
        proc.join(timeout=WAIT)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == -signal.SIGKILL
