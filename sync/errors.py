"""Why a weight update failed, and what state it left the model in.

The class says what the server may do next: a `WeightUpdateError` (and its subclasses) means the model
was never written, so the old weights keep serving; a `PartialUpdateError` means some tensors were copied
and could not be restored, so the server must refuse to generate until the next good update.
"""

from __future__ import annotations


class WeightUpdateError(ValueError):
    """The update was refused before the first copy, or rolled back: the model holds its old weights."""


class CheckpointNotFoundError(FileNotFoundError, WeightUpdateError):
    """A checkpoint path that does not exist or holds no safetensors files (nothing was copied)."""


class PartialUpdateError(RuntimeError):
    """Some tensors were copied and the old values could not be restored: the model is inconsistent."""


class GroupJoinError(RuntimeError):
    """Joining (or creating) a weight-update process group failed or timed out."""


class BroadcastError(RuntimeError):
    """A broadcast on a weight-update group failed (a peer died, hung past the timeout, or sent junk)."""
