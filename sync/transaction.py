"""Streamed in-place updates that can be undone: back up each target just before overwriting it.

For streams too large to hold whole before copying (a checkpoint on disk, a broadcast), validating
everything first would mean keeping every incoming tensor. A `Transaction` instead copies each tensor as
it arrives and keeps a clone of the old value of every target it has written; if a later tensor fails
(bad shape, a peer dies mid-broadcast), `rollback()` puts the old values back, exactly.

Memory cost: one clone of each target written so far, so up to one full copy of the updated weights
(540 MB for SmolLM2 in fp32) at the moment of commit, on the target's device unless `backup_device` says
otherwise (e.g. "cpu" to spare GPU memory at the price of device-to-host copies). Backups are dropped at
commit. Peak memory of a streamed update is therefore about model + updated weights + one incoming
chunk, versus model + all incoming tensors for validate-first.
"""

from __future__ import annotations

import time
from typing import Iterable

import torch

from sync.checksum import tensor_checksum, update_digest
from sync.errors import PartialUpdateError, WeightUpdateError
from sync.report import UpdateReport
from sync.targets import resolve_target


class Transaction:
    """`with Transaction(model) as tx: tx.apply_all(stream)` commits on success, rolls back on error."""

    def __init__(self, model: torch.nn.Module, *, digest: bool = True,
                 backup_device: torch.device | str | None = None):
        self._model = model
        self._digest = digest
        self._backup_device = backup_device
        self._backups: list[tuple[torch.Tensor, torch.Tensor]] = []  # (target, old value)
        self._names: list[str] = []
        self._skipped: list[str] = []
        self._seen: set[str] = set()
        self._checksums: list[tuple[str, int]] = []
        self._num_bytes = 0
        self._start = time.perf_counter()
        self._state = "open"
        self.report: UpdateReport | None = None

    @property
    def backup_bytes(self) -> int:
        """Memory held by backups right now."""
        return sum(b.nbytes for _, b in self._backups)

    def apply(self, name: str, tensor: torch.Tensor) -> None:
        """Validate one tensor, back up its target, copy it in place."""
        if self._state != "open":
            raise RuntimeError(f"Transaction already {self._state}.")
        if not isinstance(tensor, torch.Tensor):
            raise WeightUpdateError(f"Weight {name} is a {type(tensor).__name__}, not a tensor.")
        if name in self._seen:
            raise WeightUpdateError(f"Weight {name} appears twice in one update.")
        target = resolve_target(self._model, name, tensor.shape, tensor.dtype)
        self._seen.add(name)
        if target is None:
            self._skipped.append(name)
            return
        device = target.device if self._backup_device is None else self._backup_device
        self._backups.append((target, target.detach().to(device, copy=True)))
        with torch.no_grad():
            target.copy_(tensor)
        self._names.append(name)
        self._num_bytes += target.nbytes
        if self._digest:
            self._checksums.append((name, tensor_checksum(target)))

    def apply_all(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in named:
            self.apply(name, tensor)

    def commit(self) -> UpdateReport:
        if self._state != "open":
            raise RuntimeError(f"Transaction already {self._state}.")
        self._state = "committed"
        self._backups.clear()
        self.report = UpdateReport(names=self._names, skipped=self._skipped, num_bytes=self._num_bytes,
                                   seconds=time.perf_counter() - self._start,
                                   digest=update_digest(self._checksums) if self._digest else None)
        return self.report

    def rollback(self) -> None:
        """Restore every target written so far; the model is then bit for bit what it was."""
        if self._state == "rolled back":
            return
        if self._state != "open":
            raise RuntimeError(f"Transaction already {self._state}.")
        self._state = "rolled back"
        try:
            with torch.no_grad():
                # Newest first, so a name written twice ends with its oldest value.
                while self._backups:
                    target, old = self._backups.pop()
                    target.copy_(old)
        except Exception as e:  # only a device failure can get here; the model is now a mix
            raise PartialUpdateError(f"Rollback failed, the model holds a mix of old and new weights: "
                                     f"{e}") from e

    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if self._state == "open":
                self.commit()
        elif self._state == "open":
            self.rollback()  # then the original exception propagates


def apply_in_place_with_backup(model: torch.nn.Module, named: Iterable[tuple[str, torch.Tensor]], *,
                               digest: bool = True,
                               backup_device: torch.device | str | None = None) -> UpdateReport:
    """Copy a stream in place as it arrives; on any error restore the old weights and re-raise it."""
    with Transaction(model, digest=digest, backup_device=backup_device) as tx:
        tx.apply_all(named)
    assert tx.report is not None
    return tx.report
