"""One broadcast on a weight-update group, with failures turned into a BroadcastError that says where.

gloo notices a peer that dies between messages at once (its socket closes), but one that dies in the
middle of a message leaves the receiver waiting for the rest until the group timeout (measured: torch
2.13, a trainer SIGKILLed during an 800 MB broadcast). So a receiver also watches the group's store,
which the trainer (rank 0) hosts in its own process: when the trainer dies, the store connection resets
and the wait ends within about `STORE_CHECK_EVERY` seconds. A peer that is alive but silent still fails
at the group timeout. The caller should then destroy the group (sync.process_group).
"""

from __future__ import annotations

import threading
import time

import torch
import torch.distributed as dist

from sync.errors import BroadcastError
from sync.process_group import group_store

STORE_CHECK_EVERY = 0.5  # seconds between liveness checks of the trainer's store while waiting


class PendingBroadcast:
    """A broadcast in flight (`broadcast(..., wait=False)`); `wait()` raises BroadcastError as `broadcast` does."""

    def __init__(self, work: dist.Work, group: dist.ProcessGroup, what: str, watch_store: bool):
        self.work, self.group, self.what, self.watch_store = work, group, what, watch_store

    def wait(self) -> None:
        try:
            if self.watch_store:
                _wait_watching_store(self.work, self.group, self.what)
            self.work.wait()
        except BroadcastError:
            raise
        except Exception as e:
            raise BroadcastError(f"Broadcast of {self.what} on group {self.group.group_name!r} failed: {e}") from e


def broadcast(tensor: torch.Tensor, group: dist.ProcessGroup, src: int, what: str, *,
              watch_store: bool = False, wait: bool = True) -> PendingBroadcast | None:
    """Broadcast in place from group rank `src`; a dead or silent peer raises within the group timeout.

    wait=False returns at once with the broadcast in flight (a sender overlaps the next bucket's copy
    with it); `tensor` must not be touched until its `wait()` returns.
    """
    try:
        # group_src: `src` is the rank in this group, whatever the process's own default group says.
        work = dist.broadcast(tensor, group=group, group_src=src, async_op=True)
    except Exception as e:
        raise BroadcastError(f"Broadcast of {what} on group {group.group_name!r} failed: {e}") from e
    pending = PendingBroadcast(work, group, what, watch_store)
    if not wait:
        return pending
    pending.wait()
    return None


def _wait_watching_store(work: dist.Work, group: dist.ProcessGroup, what: str) -> None:
    store = group_store(group)
    # Woken by the work's completion callback, so a finished message costs no polling delay (a poll
    # that slept up to a few ms per bucket made a 24-bucket update ~1.7x a raw broadcast).
    done = threading.Event()
    work.get_future().add_done_callback(lambda _: done.set())
    while not done.wait(STORE_CHECK_EVERY):
        try:
            store.check(["liveness"])  # a round trip to the trainer's store daemon
        except Exception as e:
            _abandon(work, group)
            raise BroadcastError(f"Broadcast of {what} on group {group.group_name!r} failed: the trainer "
                                 f"hosting the group's store is gone ({e}).") from e


def _abandon(work: dist.Work, group: dist.ProcessGroup) -> None:
    """Keep an abandoned receive and its group alive, off the caller's thread, until gloo gives up on it.

    The receive ends only at the group timeout, and until then the group's destructor blocks (joining
    gloo's worker thread). Holding both references in a daemon thread's frame means dropping the group
    (after destroy_process_group) never blocks the caller, and interpreter exit does not wait either
    (daemon frames are not torn down).
    """
    def hold(work: dist.Work = work, group: dist.ProcessGroup = group) -> None:
        while not work.is_completed():
            time.sleep(1.0)

    threading.Thread(target=hold, name=f"abandoned-broadcast-{group.group_name}", daemon=True).start()
