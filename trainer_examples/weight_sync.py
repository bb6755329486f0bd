"""How the GRPO examples push the trainer's weights to the rollout servers, through the public client."""

from __future__ import annotations

import os
import shutil
import time

import torch

from rollout import RolloutClient
from sync import flatten_parameters


class BroadcastSync:
    """Every step: one gloo broadcast from the trainer (rank 0) to every server of the client at once."""

    def __init__(self, client: RolloutClient, verify: bool = False):
        self.client = client
        self.verify = verify
        self.group = client.init_weights_update_group("127.0.0.1", backend="gloo")

    def prepare(self, model: torch.nn.Module) -> None:
        """Lay the parameters back to back in named_parameters() order, so every bucket of a push is a view
        of them: no copy on this side, and each server receives straight into its own weights."""
        flatten_parameters(model)

    def due(self, step: int) -> bool:
        return True

    def push(self, model: torch.nn.Module, version: str) -> float:
        start = time.monotonic()
        named = [(n, p.detach()) for n, p in model.named_parameters()]
        self.client.update_weights_from_distributed(self.group, named, weight_version=version, verify=self.verify)
        return time.monotonic() - start

    def close(self) -> None:
        self.client.destroy_weights_update_group(self.group)


class DiskSync:
    """Every `every` steps: save a safetensors checkpoint and have every server reload it from disk. Between
    syncs the servers sample from older weights; the importance ratio against the rollout logprobs corrects
    for it (the logged mismatch shows how far off-policy the rollouts are)."""

    def __init__(self, client: RolloutClient, directory: str, every: int, verify: bool = False):
        self.client = client
        self.directory = directory
        self.every = every
        self.verify = verify
        self.last: str | None = None

    def prepare(self, model: torch.nn.Module) -> None:
        """Nothing: save_pretrained must see separate tensors (it reads shared storage as tied weights)."""

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def push(self, model: torch.nn.Module, version: str) -> float:
        start = time.monotonic()
        path = os.path.join(self.directory, version)
        model.save_pretrained(path, safe_serialization=True)
        self.client.update_weights_from_disk(path, weight_version=version, verify=self.verify)
        if self.last is not None:
            shutil.rmtree(self.last, ignore_errors=True)  # keep one checkpoint on disk
        self.last = path
        return time.monotonic() - start

    def close(self) -> None:
        pass
