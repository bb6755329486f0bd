"""Loads HF safetensors checkpoints into a model by HF names, one file at a time."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from tqdm import tqdm

from sync.targets import missing_weights

logger = logging.getLogger(__name__)


def safetensors_files(model_path: str | Path) -> list[Path]:
    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No *.safetensors files in {model_path}.")
    return files


def iterate_weights(model_path: str | Path, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every tensor of the checkpoint; only one file is open at a time."""
    files = safetensors_files(model_path)
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            for key in tqdm(keys, desc=f"Loading {path.name}", disable=not progress, leave=False):
                yield key, f.get_tensor(key)


def copy_into_target(target: torch.Tensor | None, hf_name: str, tensor: torch.Tensor) -> None:
    """A model's load_weight: copy a checkpoint tensor into the tensor its HF name lives in (None: the
    model keeps no such weight)."""
    if target is None:
        return
    if tuple(target.shape) != tuple(tensor.shape):
        raise ValueError(f"Shape mismatch for {hf_name}: model has {tuple(target.shape)}, "
                         f"checkpoint has {tuple(tensor.shape)}.")
    target.copy_(tensor)


def load_model_weights(model: torch.nn.Module, model_path: str | Path, progress: bool = True) -> None:
    """Copy every checkpoint tensor into the model in place; every model weight must be covered."""
    loaded: set[str] = set()
    for name, tensor in iterate_weights(model_path, progress):
        try:
            model.load_weight(name, tensor)
        except KeyError:
            logger.warning("Checkpoint tensor %s has no place in the model; skipped.", name)
            continue
        loaded.add(name)
    missing = missing_weights(model, sorted(loaded))
    if missing:
        raise ValueError(f"Checkpoint {model_path} lacks {len(missing)} weights, e.g. {sorted(missing)[:5]}.")
