"""Receive one `/update_weights_from_distributed` request into the model: directly, or buffered then copied.

- direct (the default): a bucket whose bytes are one range of the model's flat storage
  (sync.direct_target) is broadcast straight into the parameters, and per-tensor broadcasts go straight
  into their targets: as fast as a raw broadcast, no extra memory. A broadcast that breaks midway leaves
  those bytes half written, so it raises `PartialUpdateError` (the server refuses to generate until the
  next good update) instead of `BroadcastError`.
- buffered ("safe"), and any bucket that does not map: receive the whole request, then copy it in; a
  dead peer leaves the old weights untouched (`BroadcastError`). Buckets land in a scratch buffer kept per
  group (sync.scratch), so no update faults in fresh pages; per-tensor requests (possibly the whole
  model) get fresh buffers, so a server never keeps a model-sized buffer around.

What arrives is checked before it is copied in (sync.tensor_checks: finite values, the trainer's optional
digests), so a bad buffered request is refused with the old weights serving; bytes received directly into
the weights can only be checked after the fact, so a bad direct receive raises `PartialUpdateError`.

Specs that do not fit the model are still received (buffered, then dropped) before the refusal, so the
trainer's broadcast completes instead of blocking until the group timeout.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from sync._broadcast import broadcast
from sync.bucket import ALIGN, layout_bucket, unflatten_bucket
from sync.direct_target import bucket_view, tensor_view
from sync.errors import BroadcastError, PartialUpdateError, WeightUpdateError
from sync.named_tensors import apply_named_tensors
from sync.report import UpdateReport
from sync.scratch import ScratchBuffer
from sync.specs import TensorSpecs, nbytes_of, parse_dtype
from sync.tensor_checks import digest_error, non_finite_error

RECEIVE_MODES = ("direct", "buffered")


def _first_problem(named: list[tuple[str, torch.Tensor]], digests: dict[str, int] | None) -> str | None:
    for name, tensor in named:
        problem = non_finite_error(name, tensor) or (digest_error(name, tensor, digests) if digests else None)
        if problem is not None:
            return problem
    return None


def _check_received(named: list[tuple[str, torch.Tensor]], digests: dict[str, int] | None, direct: bool) -> None:
    """Refuse bad values: before the copy (buffered), or after they landed in the weights (direct: a mix)."""
    problem = _first_problem(named, digests)
    if problem is None:
        return
    if direct:
        raise PartialUpdateError(f"{problem}; it was received directly into the weights, which now hold it")
    raise WeightUpdateError(problem)


def _partial(e: BroadcastError, where: str) -> PartialUpdateError:
    return PartialUpdateError(f"{str(e).rstrip('.')}; it was being received directly into {where}, which may now "
                              "hold partly new bytes (direct receive)")


class ModelReceiver:
    """One per server; `scratch` holds one receive buffer per group name."""

    def __init__(self, model: torch.nn.Module, mode: str = "direct"):
        if mode not in RECEIVE_MODES:
            raise ValueError(f"Weight-update receive mode must be one of {list(RECEIVE_MODES)}, got {mode!r}.")
        self.model = model
        self.mode = mode
        self.scratch: dict[str, ScratchBuffer] = {}
        self.last_path = ""  # "direct", "buffered" or "mixed" (per tensor): what the last request used

    def drop_scratch(self, group_name: str | None = None) -> None:
        for name in [group_name] if group_name is not None else list(self.scratch):
            self.scratch.pop(name, None)

    def receive_bucket(self, group: dist.ProcessGroup, group_name: str, specs: TensorSpecs,
                       targets: list[torch.Tensor | None] | None, device: torch.device | str,
                       digests: dict[str, int] | None = None) -> UpdateReport:
        """One flat broadcast. `targets`: check_specs' result, or None when the request is refused (drain only)."""
        start = time.perf_counter()
        meta = layout_bucket(specs)
        what = f"bucket ({len(meta.names)} tensors, first {meta.names[0]})"
        view = None
        if targets is not None and self.mode == "direct":
            view = bucket_view(targets, meta, device)
        if view is not None:
            try:
                broadcast(view, group, 0, what, watch_store=True)
            except BroadcastError as e:
                raise _partial(e, f"weights {meta.names[0]} .. {meta.names[-1]}") from e
            self.last_path = "direct"
            _check_received(list(zip(meta.names, targets)), digests, direct=True)
            return UpdateReport(names=list(meta.names), skipped=[], num_bytes=meta.buffer_nbytes(),
                                seconds=time.perf_counter() - start, digest=None)
        scratch = self.scratch.setdefault(group_name, ScratchBuffer())
        flat = scratch.take(meta.buffer_nbytes(), device).view(parse_dtype(meta.buffer_dtype))
        broadcast(flat, group, 0, what, watch_store=True)
        if targets is None:
            return UpdateReport(names=[], skipped=[], num_bytes=0, seconds=0.0, digest=None)
        self.last_path = "buffered"
        named = unflatten_bucket(flat, meta)
        _check_received(named, digests, direct=False)
        return apply_named_tensors(self.model, named, digest=False, check=False)

    def receive_tensors(self, group: dist.ProcessGroup, specs: TensorSpecs,
                        targets: list[torch.Tensor | None] | None, device: torch.device | str,
                        digests: dict[str, int] | None = None) -> UpdateReport:
        """One broadcast per tensor, each into its target when it can be (direct mode), else into a buffer."""
        start = time.perf_counter()
        dtypes = specs.torch_dtypes()
        direct: list[torch.Tensor | None] = [None] * len(specs)
        if targets is not None and self.mode == "direct":
            direct = [tensor_view(t, d, device) for t, d in zip(targets, dtypes)]
        # One fresh buffer for the rest, sliced per tensor (aligned so each slice views as its dtype).
        offsets, end = [], 0
        for shape, dtype, d in zip(specs.shapes, dtypes, direct):
            end = -(-end // ALIGN) * ALIGN
            offsets.append(end)
            end += 0 if d is not None else nbytes_of(shape, dtype)
        buf = torch.empty(end, dtype=torch.uint8, device=device)
        buffered: list[tuple[str, torch.Tensor]] = []
        written = 0  # tensors received straight into the model so far
        n = len(specs)
        for i, (name, shape, dtype) in enumerate(zip(specs.names, specs.shapes, dtypes)):
            into = direct[i]
            if into is None:
                into = buf[offsets[i]:offsets[i] + nbytes_of(shape, dtype)].view(dtype).view(shape)
                buffered.append((name, into))
            try:
                broadcast(into, group, 0, f"tensor {name} ({i + 1}/{n})", watch_store=True)
            except BroadcastError as e:
                if written or direct[i] is not None:
                    raise _partial(e, f"{written + (direct[i] is not None)} weights up to {name}") from e
                raise
            written += direct[i] is not None
        if targets is None:
            return UpdateReport(names=[], skipped=[], num_bytes=0, seconds=0.0, digest=None)
        received = [(nm, d) for nm, d in zip(specs.names, direct) if d is not None] + buffered
        _check_received(received, digests, direct=written > 0)
        # Validated before the broadcast (check_specs) and checked above, so this copy is never refused.
        report = apply_named_tensors(self.model, buffered, digest=False, check=False)
        self.last_path = "direct" if not buffered else "buffered" if not written else "mixed"
        names = [nm for nm, d in zip(specs.names, direct) if d is not None]
        return UpdateReport(names=names + report.names, skipped=report.skipped,
                            num_bytes=sum(d.nbytes for d in direct if d is not None) + report.num_bytes,
                            seconds=time.perf_counter() - start, digest=None)

