"""The request-to-token table: row r holds the KV slot of every position of the request in row r.

Page tables for a step are a single gather of rows from it, with no per-request Python work.
"""

from __future__ import annotations

import torch


class ReqToTokenPool:
    def __init__(self, num_rows: int, max_context: int, pad_slot: int, device: torch.device | str):
        self.num_rows = num_rows
        self.max_context = max_context
        self.pad_slot = pad_slot
        self.table = torch.full((num_rows, max_context), pad_slot, dtype=torch.int64, device=device)
        self._free = list(range(num_rows - 1, -1, -1))

    def available(self) -> int:
        return len(self._free)

    def alloc(self) -> int | None:
        return self._free.pop() if self._free else None

    def free(self, row: int) -> None:
        assert row not in self._free, f"row {row} freed twice"
        self.table[row].fill_(self.pad_slot)
        self._free.append(row)

    def write(self, row: int, start: int, slots: torch.Tensor) -> None:
        self.table[row, start:start + slots.shape[0]] = slots

    def read(self, row: int, start: int, end: int) -> torch.Tensor:
        return self.table[row, start:end]

    def reset(self) -> None:
        self.table.fill_(self.pad_slot)
        self._free = list(range(self.num_rows - 1, -1, -1))
