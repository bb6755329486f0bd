"""Joining a trainer's weight-update process group, the way SGLang-based trainers create it.

OpenRLHF, slime and verl build the group with torch's own machinery so that it is not the default group
(their trainer already has one): a TCP store at `tcp://{master_address}:{master_port}` that the trainer
(rank 0) hosts, a `PrefixStore(group_name, store)` around it, and `_new_process_group_helper` to create
a group of `world_size` ranks on that store. Doing exactly the same here puts our keys under the same
prefixes, so their trainer code joins our servers unchanged. The helper is a private torch function (the
public `new_group` needs a default group spanning every rank, which trainer and servers do not share);
we use it as they do and register the identity rank map they register, so `dist.broadcast(t, src=0,
group=g)` and `dist.destroy_process_group(g)` work on the result.

Every step is bounded by `timeout`: a server waits that long for the trainer's store to listen, every
rank waits that long for the others in the gloo/NCCL address exchange, and later each collective fails
after it. Measured (torch 2.13, gloo): a 2 s timeout with no peer fails in 2.0 s on either side.
"""

from __future__ import annotations

import datetime
import socket
import time
from typing import Any
from urllib.parse import urlparse

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from sync.errors import GroupJoinError

DEFAULT_TIMEOUT = datetime.timedelta(seconds=300)


def tcp_init_method(master_address: str, master_port: int) -> str:
    host = f"[{master_address}]" if ":" in master_address else master_address  # IPv6 literal
    return f"tcp://{host}:{master_port}"


def _as_timedelta(timeout: datetime.timedelta | float | None) -> datetime.timedelta:
    if timeout is None:
        return DEFAULT_TIMEOUT
    return timeout if isinstance(timeout, datetime.timedelta) else datetime.timedelta(seconds=timeout)


def init_custom_process_group(backend: str, init_method: str, world_size: int, rank: int,
                              group_name: str, timeout: datetime.timedelta | float | None = None,
                              backend_options: Any = None) -> dist.ProcessGroup:
    """Create (rank 0: host) or join the group; returns it. The default group, if any, is untouched.

    Raises GroupJoinError naming the address, rank and group on any failure, within about `timeout`.
    """
    timeout = _as_timedelta(timeout)
    deadline = time.monotonic() + timeout.total_seconds()
    where = f"weight-update group {group_name!r} at {init_method} as rank {rank} of {world_size} ({backend})"
    if not 0 <= rank < world_size:
        raise GroupJoinError(f"Cannot join {where}: rank out of range.")
    try:
        store = _store(init_method, world_size, rank, timeout, deadline)
        store = dist.PrefixStore(group_name, store)
        group, _ = c10d._new_process_group_helper(world_size, rank, [], backend, store, group_name=group_name,
                                                  backend_options=backend_options, timeout=timeout)
        # The helper registers no rank map for a group created like a default one; collectives on it
        # translate ranks through this map (identity: the group's ranks are the only ones it knows).
        c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    except Exception as e:
        waited = timeout.total_seconds() - (deadline - time.monotonic())
        raise GroupJoinError(f"Cannot join {where} (gave up after {waited:.1f} s, timeout "
                             f"{timeout.total_seconds():g} s): {e}") from e
    return group


def _store(init_method: str, world_size: int, rank: int, timeout: datetime.timedelta,
           deadline: float) -> dist.Store:
    url = urlparse(init_method)
    if url.scheme != "tcp":  # env://, file://: torch's own rendezvous handlers
        store, _, _ = next(dist.rendezvous(init_method, rank, world_size, timeout=timeout))
        store.set_timeout(timeout)
        return store
    if url.hostname is None or url.port is None:
        raise ValueError(f"{init_method} lacks a host or port.")
    # Built here rather than by the tcp:// rendezvous handler, which under torchrun
    # (TORCHELASTIC_USE_AGENT_STORE) would make the trainer a client of a store nobody hosts.
    if rank == 0:
        # The trainer hosts the store. It does not wait for the others here (TCPStore's own wait
        # overshoots the timeout by a second); the group's address exchange below waits, up to timeout.
        return dist.TCPStore(url.hostname, url.port, world_size, is_master=True, timeout=timeout,
                             multi_tenant=True, wait_for_workers=False)
    # TCPStore's client retries for up to twice its timeout when nobody listens: knock on the port
    # ourselves until the deadline, then connect with what time is left.
    _wait_for_listener(url.hostname, url.port, deadline)
    left = datetime.timedelta(seconds=max(deadline - time.monotonic(), 1.0))
    store = dist.TCPStore(url.hostname, url.port, world_size, is_master=False, timeout=left)
    store.set_timeout(timeout)  # later waits (the address exchange) get the full timeout
    return store


def _wait_for_listener(host: str, port: int, deadline: float) -> None:
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(min(deadline - time.monotonic(), 1.0), 0.01)):
                return
        except OSError as e:
            if time.monotonic() + 0.05 >= deadline:
                raise TimeoutError(f"nothing listens at {host}:{port} ({e})") from None
            time.sleep(0.05)


def group_store(group: dist.ProcessGroup) -> dist.Store:
    """The group's store (prefixed by its name), which the trainer (rank 0) hosts in its own process: a
    round trip to it (`store.check(["liveness"])`) fails once the trainer is gone."""
    get_store = getattr(group, "get_group_store", None)
    if get_store is not None:
        return get_store()
    # Older torch has no public accessor; _new_process_group_helper registered the store in this map.
    return c10d._world.pg_map[group][1]


def destroy_process_group(group: dist.ProcessGroup) -> None:
    """Shut the group down and forget it (its name can be used again); other groups are untouched.

    Returns at once, also after a broken broadcast (sync._broadcast keeps an abandoned receive alive on
    a daemon thread until gloo gives up on it, so dropping the group never blocks).
    """
    dist.destroy_process_group(group)
