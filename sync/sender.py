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
from sync.bucket import BucketMeta, flatten_bucket, plan_buckets
from sync.scratch import ScratchBuffer
from sync.specs import TensorSpecs

DEFAULT_BUCKET_BYTES = 64 << 20  # measured on gloo, 540 MB: 64 MiB buckets 1.07x a raw flat broadcast, 512 MiB 1.12x


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
    def specs(named: Iterable[tuple[str, torch.Tensor]]) -> TensorSpecs:
        """What a per-tensor update announces."""
        return TensorSpecs.of(named)

    def plan(self, named: Iterable[tuple[str, torch.Tensor]]) -> list[BucketMeta]:
        """The buckets `send_buckets` will send, in order (each one request of load_format flattened_bucket)."""
        return plan_buckets(((n, t.shape, t.dtype) for n, t in named), self.bucket_bytes,
                            split_on_dtype=self.split_on_dtype)

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
            # This buffer last carried bucket k-2, which completed before bucket k-1 was sent.
            flat, built = flatten_bucket(chunk, self.scratch[k % 2])
            assert built == meta, "plan_buckets and flatten_bucket disagree on a layout"
            if pending is not None:
                pending.wait()  # before the hook: it may announce bucket k as the only one unsent
            if on_bucket is not None:
                on_bucket(meta)
            pending = broadcast(flat, self.group, self.src, f"bucket {k + 1}/{len(metas)} ({len(meta.names)} "
                                                            f"tensors, first {meta.names[0]})", wait=False)
        if pending is not None:
            pending.wait()
        return metas
