"""Page-granular allocator of KV cache token slots (slot = page * page_size + offset)."""

from __future__ import annotations

import torch


class PageAllocator:
    """Hands out whole KV cache pages; a request's tokens start at offset 0 of its first page.

    No page is reserved: all `num_pages` pages are usable (the model runner keeps its own
    padding slot outside this range). Slot lists handed to `free_slots` may mix every slot
    of a request; only the first slot of each page identifies the page to free.
    """

    def __init__(self, num_pages: int, page_size: int = 1, device: torch.device | str = "cpu"):
        if num_pages < 0 or page_size < 1:
            raise ValueError(f"bad allocator shape: num_pages={num_pages}, page_size={page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.device = torch.device(device)
        self._offsets = torch.arange(page_size, dtype=torch.int64, device=self.device)
        self.reset()

    def reset(self) -> None:
        self._free = torch.arange(self.num_pages, dtype=torch.int64, device=self.device)
        # Freed pages are parked here and merged into `_free` only when an allocation needs
        # them, so a free costs no copy of the whole free list.
        self._released: list[torch.Tensor] = []
        self._num_released = 0
        # 1 = free, 0 = in use; a free that pushes a page to 2 is a double free.
        self._free_count = torch.ones(self.num_pages, dtype=torch.int32, device=self.device)

    def available_pages(self) -> int:
        return self._free.numel() + self._num_released

    def available_tokens(self) -> int:
        return self.available_pages() * self.page_size

    def alloc_pages(self, n: int) -> torch.Tensor | None:
        """`n` page ids (int64), or None (allocating nothing) if fewer than `n` are free."""
        if n > self.available_pages():
            return None
        if n > self._free.numel():
            self._free = torch.cat([self._free, *self._released])
            self._released.clear()
            self._num_released = 0
        pages, self._free = self._free[:n], self._free[n:]
        self._free_count[pages] = 0
        return pages

    def alloc_tokens(self, cur_len: int, last_slot: int, num_new: int) -> torch.Tensor | None:
        """Slots for `num_new` more tokens of a request holding `cur_len` tokens ending at `last_slot`.

        The rest of the last, partly filled page is used first, then whole new pages.
        `last_slot` is ignored when `cur_len == 0`. None (allocating nothing) if out of pages.
        """
        ps = self.page_size
        if ps == 1:
            return self.alloc_pages(num_new)
        used_in_last = cur_len % ps
        in_last = 0 if used_in_last == 0 else min(ps - used_in_last, num_new)
        rest = num_new - in_last
        pages = self.alloc_pages(-(-rest // ps))
        if pages is None:
            return None
        tail = (pages[:, None] * ps + self._offsets).flatten()[:rest]
        if in_last == 0:
            return tail
        last_slot = int(last_slot)
        assert last_slot % ps == used_in_last - 1, "last_slot does not match cur_len"
        head = torch.arange(last_slot + 1, last_slot + 1 + in_last, dtype=torch.int64, device=self.device)
        return torch.cat([head, tail])

    def alloc_decode(self, cur_lens: torch.Tensor, last_slots: torch.Tensor) -> torch.Tensor | None:
        """One new slot for each of B requests (vectorized); None (allocating nothing) if out of pages."""
        ps = self.page_size
        if ps == 1:
            return self.alloc_pages(cur_lens.numel())
        # Pass cur_lens on the CPU to keep the page count free of a device sync.
        needs_page = cur_lens % ps == 0
        pages = self.alloc_pages(int(needs_page.sum()))
        if pages is None:
            return None
        out = last_slots.to(self.device, torch.int64) + 1
        out[needs_page.to(self.device)] = pages * ps
        return out

    def free_slots(self, slots: torch.Tensor) -> None:
        """Free the pages whose first slot appears in `slots`; raises AssertionError on a double free."""
        if slots.numel() == 0:
            return
        slots = slots.to(self.device, torch.int64)
        if self.page_size == 1:
            # Copy: callers often pass a view of a table row they will overwrite later.
            pages = slots.clone()
        else:
            pages = slots[slots % self.page_size == 0] // self.page_size
            if pages.numel() == 0:
                return
        self._free_count.index_add_(0, pages, torch.ones_like(pages, dtype=torch.int32))
        if int(self._free_count[pages].max()) > 1:
            self._free_count.index_add_(0, pages, torch.full_like(pages, -1, dtype=torch.int32))
            raise AssertionError("double free of KV cache pages")
        self._released.append(pages)
        self._num_released += pages.numel()
