"""Weight updates as tensors over HTTP (`/update_weights_from_tensor`): no process group, no shared disk.

For servers the trainer reaches only by HTTP, or a few tensors at a time (a LoRA merge, a head). The tensors
travel as safetensors bytes in base64 (sync.encode_named_tensors, never pickle), in buckets of at most
`bucket_bytes` raw bytes: each bucket is one request on every server. A bucket is decoded, checked (NaN/Inf,
and the digests with `verify`) and applied by the server before the next is sent, so the server holds one
bucket at a time, and its HTTP front end is busy with one for a few tens of milliseconds (finding the payload
in the body: benchmarks/health_latency.py), where a whole model in one body holds it for ~170 ms. The last
bucket carries `weight_version`. A bucket refused after accepted ones leaves the weights a mix of old and
new: the servers are then left paused (never serving the mix) and the error says so; a complete update
followed by `continue_generation()` brings them back.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Iterable

from rollout.client.errors import WeightUpdateError
from rollout.client.results import ServerReply
from rollout.client.weight_updates import WeightUpdateMixin, mixed_weights_error

if TYPE_CHECKING:
    import torch

DEFAULT_BUCKET_BYTES = 64 << 20


class TensorUpdateMixin(WeightUpdateMixin):
    async def update_weights_from_tensor(self, named_tensors: Iterable[tuple[str, "torch.Tensor"]], *,
                                         weight_version: str | None = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                                         pause: str | None = "retract", verify: bool = False,
                                         timeout: float | None | str = "default") -> list[ServerReply]:
        """Every server copies `named_tensors` (HF names, any device: sent from CPU copies) into its weights,
        bucket by bucket. `verify`: each bucket carries the CRC-32 of every tensor, which the server checks
        before applying it. Answers the last bucket's replies."""
        from sync import encode_named_tensors, plan_buckets, tensor_checksum

        named = list(named_tensors)
        if not named:
            raise ValueError("named_tensors is empty: nothing to update.")
        by_name = dict(named)
        if len(by_name) != len(named):
            raise ValueError("named_tensors names a tensor twice.")
        plan = plan_buckets([(n, t.shape, t.dtype) for n, t in named], bucket_bytes, split_on_dtype=False)
        loop = asyncio.get_running_loop()
        replies: list[ServerReply] = []
        if pause is not None:
            await self.pause_generation(pause)
        mixed = False
        try:
            for i, meta in enumerate(plan):
                bucket = [(n, by_name[n]) for n in meta.names]
                # Encoding is a copy and a base64 pass over the bucket: off the event loop.
                payload = await loop.run_in_executor(None, encode_named_tensors, bucket)
                body: dict[str, Any] = {"serialized_named_tensors": [payload]}
                if verify:
                    body["digests"] = await loop.run_in_executor(
                        None, lambda b=bucket: {n: tensor_checksum(t) for n, t in b})
                if weight_version is not None and i == len(plan) - 1:
                    body["weight_version"] = weight_version
                what = f"update_weights_from_tensor (bucket {i + 1} of {len(plan)}, {len(bucket)} tensors)"
                try:
                    replies = await self._update_on_all(what, "/update_weights_from_tensor", body, timeout)
                except WeightUpdateError as e:
                    if i == 0 or pause is None:
                        raise
                    mixed = True  # earlier buckets are in
                    raise mixed_weights_error(what, i, e.results) from None
                del payload, body
        finally:
            if pause is not None and not mixed:
                await self.continue_generation()
        return replies
