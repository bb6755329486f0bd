"""A receive buffer kept between updates, so a buffered broadcast does not fault in fresh pages each time.

Allocating hundreds of MB per request costs more than the broadcast itself on the CPU (every page is
faulted in and zeroed by the kernel); one buffer per group, grown to the largest request seen, costs
that once. Views handed out are valid until the next `take`.
"""

from __future__ import annotations

import torch


class ScratchBuffer:
    def __init__(self) -> None:
        self._buf: dict[torch.device, torch.Tensor] = {}

    def take(self, nbytes: int, device: torch.device | str) -> torch.Tensor:
        """A uint8 tensor of `nbytes` (contents undefined); grows the buffer of `device` when too small."""
        device = torch.device(device)
        buf = self._buf.get(device)
        if buf is None or buf.numel() < nbytes:
            self._buf.pop(device, None)  # free the old one before taking the bigger one
            buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
            self._buf[device] = buf
        return buf[:nbytes]

    def nbytes(self) -> int:
        return sum(b.numel() for b in self._buf.values())

    def clear(self) -> None:
        self._buf.clear()
