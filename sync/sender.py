"""The trainer side of a broadcast update: send named tensors from rank 0 to every server in the group.

A trainer joins the group with `sync.process_group.init_custom_process_group(..., rank=0)`, tells each
server what is coming (the `on_start` / `on_bucket` hooks get the `names, dtypes, shapes` a
`/update_weights_from_distributed` request carries; post it without waiting for the answer, since the
server answers only after the broadcast), then the tensors go out in the announced order.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from sync._broadcast import broadcast
from sync.checksum import named_checksums
from sync.bucket import BucketMeta, flatten_bucket, layout_bucket, plan_buckets
from sync.direct_target import bucket_view
from sync.scratch import ScratchBuffer
from sync.specs import TensorSpecs, parse_dtype

DEFAULT_BUCKET_BYTES = 64 << 20  # measured on gloo, 540 MB: 64 MiB buckets 1.07x a raw flat broadcast, 512 MiB 1.12x
# Buckets that are views of the trainer's parameters (sync.flatten_parameters) cost no memory to send, and
# each collective has a fixed cost (measured on gloo, 513 MiB: 8 buckets 1.28x a raw broadcast, 2 buckets
# 1.11x), so such a push uses buckets of at least this size. A server that must buffer a bucket (it cannot
# map it onto its own weights) holds one of this size while receiving it.
VIEW_BUCKET_BYTES = 512 << 20


class WeightSender:
    """Broadcasts from group rank `src` (the trainer, 0). split_on_dtype=False lets one bucket mix dtypes
    (a uint8 buffer only our receiver understands); the default keeps buckets SGLang-compatible."""

    def __init__(self, group: dist.ProcessGroup, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES, src: int = 0,
                 split_on_dtype: bool = True):
        self.group = group
        self.bucket_bytes = bucket_bytes
        self.src = src
        self.split_on_dtype = split_on_dtype
        # Two bucket buffers kept across buckets and pushes (fresh pages per bucket cost about as much as
        # the broadcast itself on the CPU): bucket k+1 is copied into one while bucket k goes out of the other.
        self.scratch = (ScratchBuffer(), ScratchBuffer())

    def clear_buffers(self) -> None:
        for scratch in self.scratch:
            scratch.clear()

    @staticmethod
    def digests(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, int]:
        """The per-tensor digests a request may carry (`digests`): CRC-32 of each tensor's bytes as sent, so
        the server verifies what it received before applying it (costs a pass over the bytes; a GPU tensor
        is copied to the CPU)."""
        return named_checksums((n, t.detach()) for n, t in named)

    @staticmethod
    def specs(named: Iterable[tuple[str, torch.Tensor]]) -> TensorSpecs:
        """What a per-tensor update announces."""
        return TensorSpecs.of(named)

    def plan(self, named: Iterable[tuple[str, torch.Tensor]]) -> list[BucketMeta]:
        """The buckets `send_buckets` will send, in order (each one request of load_format flattened_bucket)."""
        named = list(named)
        limit = self.bucket_bytes
        if named and bucket_view([t.detach() for _, t in named], layout_bucket(self.specs(named)),
                                 named[0][1].device) is not None:
            limit = max(limit, VIEW_BUCKET_BYTES)  # the tensors already lie back to back: buckets are views
        return plan_buckets(((n, t.shape, t.dtype) for n, t in named), limit, split_on_dtype=self.split_on_dtype)

    def send_tensors(self, named: Iterable[tuple[str, torch.Tensor]],
                     on_start: Callable[[TensorSpecs], None] | None = None) -> TensorSpecs:
        """Broadcast each tensor in order, one collective per tensor."""
        named = list(named)
        specs = self.specs(named)
        if on_start is not None:
            on_start(specs)
        for i, (name, tensor) in enumerate(named):
            broadcast(tensor.detach().contiguous(), self.group, self.src, f"tensor {name} ({i + 1}/{len(named)})")
        return specs

    def send_buckets(self, named: Iterable[tuple[str, torch.Tensor]],
                     on_bucket: Callable[[BucketMeta], None] | None = None) -> list[BucketMeta]:
        """Broadcast the tensors flattened into buckets of at most `bucket_bytes`; one collective each.

        Bucket k+1 is flattened while bucket k is on the wire (memory: two buckets on top of the tensors,
        kept for the next push; `clear_buffers()` frees them).
        """
        named = list(named)
        metas = self.plan(named)
        start = 0
        pending = None
        for k, meta in enumerate(metas):
            chunk: Sequence[tuple[str, torch.Tensor]] = named[start:start + len(meta.names)]
            start += len(meta.names)
            flat = self._bucket_bytes(chunk, meta, self.scratch[k % 2])
            if pending is not None:
                pending.wait()  # before the hook: it may announce bucket k as the only one unsent
            if on_bucket is not None:
                on_bucket(meta)
            pending = broadcast(flat, self.group, self.src, f"bucket {k + 1}/{len(metas)} ({len(meta.names)} "
                                                            f"tensors, first {meta.names[0]})", wait=False)
        if pending is not None:
            pending.wait()
        return metas

    @staticmethod
    def _bucket_bytes(chunk: Sequence[tuple[str, torch.Tensor]], meta: BucketMeta,
                      scratch: ScratchBuffer) -> torch.Tensor:
        """The bucket's flat buffer: a view of the tensors themselves when they already sit back to back in
        memory as the bucket lays them out (a model after sync.flatten_parameters), else a copy into
        `scratch` (which last carried bucket k-2, completed before bucket k-1 was sent). The copy is most
        of a bucketed push's cost over a raw broadcast on the CPU."""
        tensors = [t.detach() for _, t in chunk]
        view = bucket_view(tensors, meta, tensors[0].device)
        if view is not None:
            return view.view(parse_dtype(meta.buffer_dtype))
        flat, built = flatten_bucket(chunk, scratch)
        assert built == meta, "plan_buckets and flatten_bucket disagree on a layout"
        return flat
