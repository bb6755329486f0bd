"""One safetensors file of a checkpoint, read with ordinary reads, never memory-mapped.

safetensors' own reader maps the file: a trainer that re-saves the checkpoint in place (truncate to 0
bytes, then write) while a server reads it makes the mapped pages vanish and the reader dies with SIGBUS.
Here the header is parsed by hand (8-byte little-endian length, then JSON) and checked against the file
size, and the data is read whole into memory with `readinto`; the file's (size, mtime, inode) is taken
when the header is read and compared before and after the data read, so a file that changes at any point
gives a `CheckpointChangedError` naming it instead of a crash or a silent mix of two versions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sync.errors import WeightUpdateError
from sync.safetensors_header import TensorEntry, entry_views, header_entries, header_length, parse_header
from sync.scratch import ScratchBuffer

class CheckpointChangedError(WeightUpdateError):
    """The file changed (size, mtime or inode) while it was being read: nothing of it was used."""


@dataclass(frozen=True)
class FileStamp:
    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, st: os.stat_result) -> "FileStamp":
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)

    def describe(self) -> str:
        return f"{self.size} bytes, mtime {self.mtime_ns}, inode {self.inode}"


class CheckpointFile:
    """The header of one file (`open`), and its tensors read in one go (`read_tensors`)."""

    def __init__(self, path: Path, stamp: FileStamp, data_start: int, entries: list[TensorEntry]):
        self.path = path
        self.stamp = stamp
        self.data_start = data_start
        self.entries = entries

    @classmethod
    def open(cls, path: str | os.PathLike) -> "CheckpointFile":
        path = Path(path)
        not_ours = f"{path} is not a safetensors file"
        try:
            with open(path, "rb") as f:
                stamp = FileStamp.of(os.fstat(f.fileno()))
                n = header_length(f.read(8), stamp.size, not_ours, "the file")
                raw = f.read(n)
        except OSError as e:
            raise WeightUpdateError(f"Cannot read {path}: {e.strerror or e}.") from None
        if len(raw) < n:
            raise CheckpointChangedError(f"{path} changed while being read: its header was cut short.")
        header = parse_header(raw, not_ours)
        data_start = 8 + n
        return cls(path, stamp, data_start, header_entries(header, str(path), stamp.size - data_start))

    def _check_unchanged(self, st: os.stat_result, when: str) -> None:
        now = FileStamp.of(st)
        if now != self.stamp:
            raise CheckpointChangedError(f"{self.path} changed while being read ({when}: was "
                                         f"{self.stamp.describe()}, now {now.describe()}); nothing of it was "
                                         "applied.")

    def read_tensors(self, names: set[str] | None = None,
                     scratch: ScratchBuffer | None = None) -> list[tuple[str, torch.Tensor]]:
        """(name, CPU tensor) in file order for `names` (all by default), from one read of the data section.

        With `scratch` the data lands in its buffer (kept between updates: no fresh pages to fault in, which
        costs more than the read itself) and the tensors are views into it, valid until its next use.
        Raises CheckpointChangedError when the file is not the one whose header was read, or changes
        while its data is read."""
        entries = [e for e in self.entries if names is None or e.name in names]
        if not entries:
            return []
        first, last = entries[0].begin, max(e.end for e in entries)
        buf = (torch.empty(last - first, dtype=torch.uint8) if scratch is None
               else scratch.take(last - first, "cpu"))
        try:
            with open(self.path, "rb") as f:
                self._check_unchanged(os.fstat(f.fileno()), "before reading its data")
                f.seek(self.data_start + first)
                view, got = memoryview(buf.numpy()), 0
                while got < len(view):
                    k = f.readinto(view[got:])
                    if not k:
                        break
                    got += k
                self._check_unchanged(os.fstat(f.fileno()), "after reading its data")
            self._check_unchanged(os.stat(self.path), "after reading its data")
        except OSError as e:
            raise CheckpointChangedError(f"Cannot read {self.path}: {e.strerror or e}.") from None
        if got < len(view):
            raise CheckpointChangedError(f"{self.path} changed while being read: {got} of {len(view)} data bytes "
                                         "could be read.")
        return entry_views(buf, entries, first)
