"""Receiving a broadcast update into fresh buffers, yielding (name, tensor) pairs (the server itself
uses sync.model_receiver, which receives into the weights directly where it can).

Nothing is received into the model directly, so a broadcast that breaks midway never leaves a
half-written parameter: feed the pairs to `apply_named_tensors` (everything first, then copy; memory:
the whole update) or to a `Transaction` (copy as they come, rollback on failure; memory: a backup of
what was written). Check the announced specs against the model (`sync.targets.check_specs`) before
the broadcast starts: a receiver that stops consuming midway leaves the trainer blocked until the group
timeout, so if it must give up after the broadcast began, finish the iterator first (`for _ in it: pass`).

A trainer that dies raises BroadcastError within about a second (gloo sees the closed connection, or the
trainer's store stops answering: see sync._broadcast); a peer that stalls raises at the group timeout.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
import torch.distributed as dist

from sync._broadcast import broadcast
from sync.bucket import BucketMeta, empty_bucket, unflatten_bucket
from sync.specs import TensorSpecs, parse_dtype


def receive_tensors(group: dist.ProcessGroup, specs: TensorSpecs, *, device: torch.device | str = "cpu",
                    src: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """One broadcast per tensor, in the announced order."""
    n = len(specs)
    for i, (name, dtype, shape) in enumerate(zip(specs.names, specs.dtypes, specs.shapes)):
        buf = torch.empty(shape, dtype=parse_dtype(dtype), device=device)
        broadcast(buf, group, src, f"tensor {name} ({i + 1}/{n})", watch_store=True)
        yield name, buf


def receive_buckets(group: dist.ProcessGroup, metas: Iterable[BucketMeta], *,
                    device: torch.device | str = "cpu", src: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """One broadcast per bucket; yields views into each received buffer.

    Build each meta from a request's names, dtypes, shapes with `layout_bucket`. `metas` is read only
    when its bucket is due, so it may be a generator fed as the trainer announces buckets.
    """
    for k, meta in enumerate(metas):
        flat = empty_bucket(meta, device)
        broadcast(flat, group, src, f"bucket {k + 1} ({len(meta.names)} tensors, first {meta.names[0]})",
                  watch_store=True)
        yield from unflatten_bucket(flat, meta)
