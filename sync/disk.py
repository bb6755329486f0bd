"""Hot updates from a local HF checkpoint: safetensors files read one at a time, checked before copying.

`validate_checkpoint` reads only the safetensors headers (names, dtypes, shapes; no tensor data) and
checks them against the model, so a wrong checkpoint is refused before the first copy and the old weights
keep serving. The copy then streams one tensor at a time (memory: the model plus the largest tensor).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import _getdtype  # safetensors' own header-code -> torch dtype table

from sync.checksum import tensor_checksum, update_digest
from sync.errors import CheckpointNotFoundError, PartialUpdateError, WeightUpdateError
from sync.report import UpdateReport
from sync.specs import TensorSpecs, dtype_name, parse_dtype
from sync.targets import missing_weights, resolve_target

logger = logging.getLogger(__name__)


def checkpoint_files(model_path: str | Path) -> list[Path]:
    """The checkpoint's *.safetensors files (a directory, or one file), in name order."""
    path = Path(model_path)
    if path.is_file() and path.suffix == ".safetensors":
        return [path]
    if not path.is_dir():
        raise CheckpointNotFoundError(f"Failed to get weights iterator: {model_path} (repository not found).")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointNotFoundError(f"Failed to get weights iterator: {model_path} (no *.safetensors files).")
    return files


def iterate_checkpoint(model_path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every tensor; one file open and one tensor loaded at a time."""
    for path in checkpoint_files(model_path):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def checkpoint_specs(model_path: str | Path) -> TensorSpecs:
    """Names, dtypes and shapes of every tensor, from the headers alone."""
    names, dtypes, shapes = [], [], []
    for path in checkpoint_files(model_path):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                try:
                    dtype = _getdtype(sl.get_dtype())
                except KeyError:
                    raise WeightUpdateError(f"Tensor {name} in {path} has dtype {sl.get_dtype()}, which torch "
                                            f"cannot read.") from None
                names.append(name)
                dtypes.append(dtype_name(dtype))
                shapes.append(list(sl.get_shape()))
    return TensorSpecs(names, dtypes, shapes)


def validate_checkpoint(model: torch.nn.Module, model_path: str | Path, *,
                        allow_unknown: bool = True) -> list[str]:
    """Check the checkpoint against the model without loading data; returns the names to copy.

    Every weight the model loads must be present with its shape and a floating dtype. Names the model
    does not know are skipped with a warning (as at load time) unless allow_unknown is False.
    """
    specs = checkpoint_specs(model_path)
    apply: list[str] = []
    seen: set[str] = set()
    for name, dtype, shape in zip(specs.names, specs.dtypes, specs.shapes):
        if name in seen:
            raise WeightUpdateError(f"Weight {name} appears in two files of {model_path}.")
        seen.add(name)
        if allow_unknown:
            try:
                model.weight_target(name)
            except KeyError:
                logger.warning("Checkpoint tensor %s has no place in the model; skipped.", name)
                continue
        if resolve_target(model, name, shape, parse_dtype(dtype)) is not None:
            apply.append(name)
    missing = missing_weights(model, list(seen))
    if missing:
        raise WeightUpdateError(f"Checkpoint {model_path} lacks {len(missing)} weights of the model, "
                                f"e.g. {missing[:5]}.")
    return apply


def update_weights_from_disk(model: torch.nn.Module, model_path: str | Path, *, digest: bool = True) -> UpdateReport:
    """Validate the checkpoint's headers, then copy it in place tensor by tensor.

    A missing path or a mismatch raises before any copy (`CheckpointNotFoundError`, `WeightUpdateError`).
    Past validation only a broken file (truncated, unreadable) can fail; that raises `PartialUpdateError`
    and the caller must stop serving until the next good update.
    """
    start = time.perf_counter()
    wanted = set(validate_checkpoint(model, model_path))
    stream = ((n, t) for n, t in iterate_checkpoint(model_path) if n in wanted)
    names: list[str] = []
    checksums: list[tuple[str, int]] = []
    num_bytes = 0
    try:
        with torch.no_grad():
            for name, tensor in stream:
                target = resolve_target(model, name, tensor.shape, tensor.dtype)
                assert target is not None  # validate_checkpoint kept only names with a target
                target.copy_(tensor)
                names.append(name)
                num_bytes += target.nbytes
                if digest:
                    checksums.append((name, tensor_checksum(target)))
    except Exception as e:
        if not names:
            raise WeightUpdateError(f"Failed to read {model_path}: {e}") from e
        raise PartialUpdateError(f"Failed after copying {len(names)} of {len(wanted)} weights from "
                                 f"{model_path}: {e}") from e
    if len(names) != len(wanted):
        error = PartialUpdateError if names else WeightUpdateError
        raise error(f"{model_path} changed while being read: copied {len(names)} of {len(wanted)} weights.")
    return UpdateReport(names=names, skipped=[], num_bytes=num_bytes, seconds=time.perf_counter() - start,
                        digest=update_digest(checksums) if digest else None)
