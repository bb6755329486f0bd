"""Hot updates from a local HF checkpoint: safetensors files read one at a time, checked before copying.

`validate_checkpoint` reads only the safetensors headers (names, dtypes, shapes; no tensor data) and
checks them against the model, so a wrong checkpoint is refused before the first copy and the old weights
keep serving. The copy then goes file by file: each file is read whole with ordinary reads (never
memory-mapped: sync.checkpoint_file says why), checked (unchanged since its header was read, every value
finite, optional per-tensor digests), and only then copied in. A one-file checkpoint (the usual case) is
thus refused with the old weights serving whatever happens to the file; with several files, a later file
that changes or fails a check after earlier ones were copied raises `PartialUpdateError`. Memory: the model
plus the largest file (a read buffer the server keeps between updates).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterator

import torch
from sync.checkpoint_file import CheckpointFile
from sync.checksum import tensor_checksum, update_digest
from sync.errors import CheckpointNotFoundError, PartialUpdateError, WeightUpdateError
from sync.report import UpdateReport
from sync.scratch import ScratchBuffer
from sync.specs import TensorSpecs, dtype_name, parse_dtype
from sync.targets import missing_weights, resolve_target
from sync.tensor_checks import check_digests, check_finite

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


def open_checkpoint(model_path: str | Path) -> list[CheckpointFile]:
    """Every file's header (WeightUpdateError naming the file if one is not safetensors)."""
    return [CheckpointFile.open(p) for p in checkpoint_files(model_path)]


def iterate_checkpoint(model_path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every tensor, each its own memory (as safetensors' get_tensor gives them: views
    of one read buffer would look like a flattened model to sync.WeightSender); read without mmap."""
    for f in open_checkpoint(model_path):
        for name, tensor in f.read_tensors():
            yield name, tensor.clone()


def checkpoint_specs(model_path: str | Path, files: list[CheckpointFile] | None = None) -> TensorSpecs:
    """Names, dtypes and shapes of every tensor, from the headers alone."""
    names, dtypes, shapes = [], [], []
    for f in open_checkpoint(model_path) if files is None else files:
        for e in f.entries:
            names.append(e.name)
            dtypes.append(dtype_name(e.dtype))
            shapes.append(list(e.shape))
    return TensorSpecs(names, dtypes, shapes)


def validate_checkpoint(model: torch.nn.Module, model_path: str | Path, *, allow_unknown: bool = True,
                        files: list[CheckpointFile] | None = None) -> list[str]:
    """Check the checkpoint against the model without loading data; returns the names to copy.

    Every weight the model loads must be present with its shape and a floating dtype. Names the model
    does not know are skipped with a warning (as at load time) unless allow_unknown is False.
    """
    specs = checkpoint_specs(model_path, files)
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


def update_weights_from_disk(model: torch.nn.Module, model_path: str | Path, *, digest: bool = True,
                             digests: dict[str, int] | None = None,
                             scratch: ScratchBuffer | None = None) -> UpdateReport:
    """Validate the checkpoint's headers, then copy it in place file by file.

    A missing path, a mismatch, a file that is not safetensors, changes while read, holds a NaN/Inf or
    does not match `digests` (CRC-32 per tensor of the bytes on disk) raises `WeightUpdateError` (or
    `CheckpointNotFoundError`) while nothing was copied; the same after an earlier file of the checkpoint
    was copied raises `PartialUpdateError` (the caller must stop serving until the next good update).
    `scratch`: a read buffer kept between updates (sync.scratch), grown to the largest file.
    """
    start = time.perf_counter()
    files = open_checkpoint(model_path)
    wanted = set(validate_checkpoint(model, model_path, files=files))
    names: list[str] = []
    checksums: list[tuple[str, int]] = []
    num_bytes = 0
    in_files = {e.name for f in files for e in f.entries}
    unknown = sorted(set(digests or {}) - in_files)
    if unknown:
        raise WeightUpdateError(f"digests name {len(unknown)} tensors that {model_path} does not hold, e.g. "
                                f"{unknown[:3]}")
    for f in files:
        try:
            everything = f.read_tensors(scratch=scratch)  # skipped names too: a trainer's digest may cover them
            here = {n for n, _ in everything}
            named = [(n, t) for n, t in everything if n in wanted]
            check_finite(named, f" in {f.path}")
            check_digests(everything, {k: v for k, v in (digests or {}).items() if k in here}, f" in {f.path}")
        except WeightUpdateError as e:
            if not names:
                raise
            raise PartialUpdateError(f"Failed after copying {len(names)} of {len(wanted)} weights from "
                                     f"{model_path}: {e}") from e
        with torch.no_grad():
            for name, tensor in named:
                target = resolve_target(model, name, tensor.shape, tensor.dtype)
                assert target is not None  # validate_checkpoint kept only names with a target
                target.copy_(tensor)
                names.append(name)
                num_bytes += target.nbytes
                if digest:
                    checksums.append((name, tensor_checksum(target)))
        del everything, named
    return UpdateReport(names=names, skipped=[], num_bytes=num_bytes, seconds=time.perf_counter() - start,
                        digest=update_digest(checksums) if digest else None)
