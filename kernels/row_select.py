"""Selecting a subset of a batch's rows, with a shortcut when the subset is every row in order."""

from __future__ import annotations

import torch


def long_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


def row_index(rows: list[int], batch: int, device: torch.device) -> torch.Tensor | None:
    """Row indices as a tensor, or None when they are all rows in order (no gather needed)."""
    if len(rows) == batch:
        return None
    return long_tensor(rows, device)


def take_rows(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    # Advanced indexing, not index_select: the latter is several times slower on wide CPU rows.
    return x if index is None else x[index]


def put_rows(dst: torch.Tensor, index: torch.Tensor | None, src: torch.Tensor) -> None:
    if index is None:
        dst.copy_(src)
    else:
        dst[index] = src
