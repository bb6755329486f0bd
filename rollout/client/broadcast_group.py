"""The trainer's end of a weight-update process group that every server of a client has joined."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class BroadcastGroup:
    process_group: Any      # torch.distributed.ProcessGroup; the trainer is rank 0
    group_name: str
    backend: str            # "gloo" (CPU tensors) or "nccl" (CUDA tensors)
    world_size: int         # 1 + the servers' ranks
    master_address: str
    master_port: int
    destroyed: bool = False
