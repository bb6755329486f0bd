"""The KV memory of the running requests: which slots each one holds, which prefixes they share.

Three nouns underneath: the PageAllocator (free pages), the RadixCache (token prefixes -> slots, shared
between requests and kept after they finish), and the ReqToTokenPool (per request, the slot of every
position). The scheduler decides who runs; this class decides where their KV lives, evicts cached
prefixes when memory runs short, gives a finished or retracted request's KV to the cache, and after a
weight update makes sure no KV computed under the old weights is reused.

A request's slots [0, prefix_len) belong to the cache (locked through `req.last_node`), the rest to the
request. With prefix caching off the tree stays empty: nothing is matched and everything is freed.
"""

from __future__ import annotations

import torch

from runtime.kv_pool import KVPool
from runtime.page_allocator import PageAllocator
from runtime.radix_cache import MatchResult, RadixCache
from runtime.req_to_token_pool import ReqToTokenPool
from runtime.request import Request


class CacheManager:
    def __init__(self, kv_pool: KVPool, page_size: int, max_running_requests: int, context_len: int,
                 prefix_caching: bool = True):
        self.kv_pool = kv_pool
        self.page_size = page_size
        self.prefix_caching = prefix_caching
        self._allocator = PageAllocator(kv_pool.num_slots // page_size, page_size, kv_pool.device)
        self._cache = RadixCache(self._allocator, page_size)
        self._req_pool = ReqToTokenPool(max_running_requests, context_len, kv_pool.pad_slot, kv_pool.device)

    # --- sizes ----------------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        """Tokens of KV the pool holds at once."""
        return self._allocator.num_pages * self.page_size

    def cached_tokens(self) -> int:
        return self._cache.total_size()

    def stats(self) -> dict:
        """The KV pool's and the prefix cache's part of the scheduler's live state."""
        total = self.num_tokens
        available = self._allocator.available_tokens()
        evictable = self._cache.evictable_size()
        return {
            "max_total_num_tokens": total,
            "kv_available_tokens": available,
            "kv_used_tokens": total - available,
            "cache_tokens": self._cache.total_size(),
            "cache_evictable_tokens": evictable,
            "cache_protected_tokens": self._cache.protected_size(),
            "token_usage": round((total - available - evictable) / max(total, 1), 6),
            "req_pool_available": self._req_pool.available(),
            "req_pool_size": self._req_pool.num_rows,
        }

    def is_idle_clean(self) -> bool:
        """No request holds KV and every slot is either free or in the cache (nothing leaked). Raises
        AssertionError when the radix cache's own integrity check fails."""
        self._cache.check_integrity()
        return (self._cache.protected_size() == 0
                and self._allocator.available_tokens() + self._cache.total_size() == self.num_tokens
                and self._req_pool.available() == self._req_pool.num_rows)

    # --- prefix sharing -------------------------------------------------------------------------

    def _shares(self, req: Request) -> bool:
        """Whether `req`'s KV is matched against and given to the tree: not with prefix caching off, and
        not KV computed under weights since replaced (stale)."""
        return self.prefix_caching and not req.kv_stale

    def match(self, req: Request) -> MatchResult:
        """The longest cached page-aligned prefix of the request's tokens (counts as recently used)."""
        if not self._shares(req):
            return MatchResult(torch.empty(0, dtype=torch.int64, device=self.kv_pool.device), self._cache.root)
        return self._cache.match_prefix(req.fill_ids)

    def share_prefix(self, req: Request) -> None:
        """After a prefill, put the prompt's KV in the cache so siblings waiting on it find it; the request
        then reads the cached copy (its own duplicates are freed)."""
        if not self._shares(req):
            return
        slots = self._req_pool.read(req.req_pool_row, 0, req.kv_len).clone()
        tokens = req.fill_ids[:req.kv_len]
        existed = self._cache.insert(tokens, slots)
        self._allocator.free_slots(slots[req.prefix_len:existed])
        match = self._cache.match_prefix(tokens)
        self._req_pool.write(req.req_pool_row, 0, match.slots)
        self._cache.inc_lock(match.last_node)
        self._cache.dec_lock(req.last_node)
        req.last_node = match.last_node
        req.prefix_len = match.slots.shape[0]

    # --- allocation -----------------------------------------------------------------------------

    def ensure_free(self, num_tokens: int) -> bool:
        """Evict cached prefixes until `num_tokens` are free; False if even that is not enough."""
        available = self._allocator.available_tokens()
        if available < num_tokens:
            self._cache.evict(num_tokens - available)
        return self._allocator.available_tokens() >= num_tokens

    def tokens_to_alloc(self, cur_len: int, n: int) -> int:
        """Free tokens (whole pages) that `n` more tokens after `cur_len` take; no more may be asked, or a
        request that fits the pool exactly would wait forever."""
        ps = self.page_size
        return (-(-(cur_len + n) // ps) - -(-cur_len // ps)) * ps

    def admit(self, req: Request, match: MatchResult, prefix_len: int, n: int, reserve: int) -> bool:
        """Give a waiting request a table row, the first `prefix_len` tokens of `match` (locked) and slots
        for `n` tokens after them, keeping `reserve` more tokens free; False (holding nothing) if short."""
        self._cache.inc_lock(match.last_node)
        if not self.ensure_free(self.tokens_to_alloc(prefix_len, n) + reserve):
            self._cache.dec_lock(match.last_node)
            return False
        last = int(match.slots[prefix_len - 1]) if prefix_len else -1
        slots = self._allocator.alloc_tokens(prefix_len, last, n)
        row = self._req_pool.alloc()
        if slots is None or row is None:
            if slots is not None:
                self._allocator.free_slots(slots)
            if row is not None:
                self._req_pool.free(row)
            self._cache.dec_lock(match.last_node)
            return False
        self._req_pool.write(row, 0, match.slots[:prefix_len])
        self._req_pool.write(row, prefix_len, slots)
        req.req_pool_row, req.last_node, req.prefix_len, req.kv_len = row, match.last_node, prefix_len, prefix_len
        return True

    def extend(self, req: Request, n: int) -> bool:
        """Slots for the next `n` tokens of a running request (a prefill chunk); False if out of memory."""
        if not self.ensure_free(self.tokens_to_alloc(req.kv_len, n)):
            return False
        last = int(self._req_pool.table[req.req_pool_row, req.kv_len - 1]) if req.kv_len else -1
        slots = self._allocator.alloc_tokens(req.kv_len, last, n)
        if slots is None:
            return False
        self._req_pool.write(req.req_pool_row, req.kv_len, slots)
        return True

    def ensure_decode_room(self, decodes: list[Request]) -> bool:
        """Whether one more token for each decoding request fits (evicting cached prefixes if needed)."""
        return self.ensure_free(sum(1 for r in decodes if r.kv_len % self.page_size == 0) * self.page_size)

    def alloc_decode(self, decodes: list[Request]) -> None:
        """One slot per decoding request, at position kv_len; ensure_decode_room must have said yes."""
        host = torch.device("cpu")  # the allocator counts new pages on the host, free of a device sync
        rows = torch.tensor([r.req_pool_row for r in decodes], device=host)
        cur = torch.tensor([r.kv_len for r in decodes], device=host)
        last = self._req_pool.table[rows, (cur - 1).clamp(min=0)]
        slots = self._allocator.alloc_decode(cur, last)
        assert slots is not None, "decode allocation failed after ensuring free memory"
        self._req_pool.table[rows, cur] = slots

    def release(self, req: Request) -> None:
        """The request stops holding KV (finished, aborted or retracted): give what the cache can keep to
        the cache and free the rest."""
        if req.req_pool_row is None:
            return
        slots = self._req_pool.read(req.req_pool_row, 0, req.kv_len).clone()
        if self._shares(req):
            existed = self._cache.insert(req.fill_ids[:req.kv_len], slots)
            aligned = req.kv_len - req.kv_len % self.page_size
            self._allocator.free_slots(slots[req.prefix_len:existed])  # duplicates of what the tree has
            self._allocator.free_slots(slots[aligned:])  # the partial last page: the tree keeps whole pages
        else:
            self._allocator.free_slots(slots[req.prefix_len:])
        if req.last_node is not None:  # None: detached from the cache by an update
            self._cache.dec_lock(req.last_node)
        self._req_pool.free(req.req_pool_row)
        req.req_pool_row = None
        req.last_node = None
        req.kv_len = 0
        req.prefix_len = 0
        req.kv_stale = False

    # --- reading the table for a forward pass ---------------------------------------------------

    def slots(self, req: Request, start: int, end: int) -> torch.Tensor:
        """KV slots of positions [start, end) of a request (a view of its table row)."""
        return self._req_pool.read(req.req_pool_row, start, end)

    def first_slots(self, reqs: list[Request]) -> list[int]:
        """The slot of position 0 of each request: equal for requests reading the same cached prefix."""
        rows = torch.tensor([r.req_pool_row for r in reqs], device=self._req_pool.table.device)
        return self._req_pool.table[rows, 0].tolist()

    def slots_at(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The slot of one position per table row (the decode tokens' output slots)."""
        return self._req_pool.table[rows, positions]

    def page_table(self, rows: torch.Tensor, width: int) -> torch.Tensor:
        """The first `width` slots of each table row, padded with the pool's padding slot."""
        return self._req_pool.table[rows, :width]

    # --- weight updates, memory release, flush -------------------------------------------------

    def detach_from_cache(self, req: Request) -> bool:
        """New weights: the request's KV is stale (it still uses it, the cache never takes it), and a
        cached prefix it reads is copied into slots of its own so the cache can be dropped. False if
        there is no memory for the copy: the caller retracts it (it recomputes under the new weights)."""
        req.kv_stale = True
        n = req.prefix_len
        if n > 0:
            if not self.ensure_free(self.tokens_to_alloc(0, n)):
                return False
            new = self._allocator.alloc_tokens(0, -1, n)
            if new is None:
                return False
            old = self._req_pool.read(req.req_pool_row, 0, n).clone()
            self.kv_pool.copy_slots(old, new)
            self._req_pool.write(req.req_pool_row, 0, new)
        # Even with no prefix in use the match may be locked: admission locks the whole match, and uses
        # less of it when the last prompt token (or prompt logprobs) must be computed.
        if req.last_node is not None:  # None: detached by an earlier update already
            self._cache.dec_lock(req.last_node)
        req.last_node = None  # the cache is about to be dropped: the request holds nothing in it
        req.prefix_len = 0
        return True

    def drop_cache(self) -> None:
        """Forget every cached prefix (their slots go back to the allocator); no request may hold one."""
        assert self._cache.protected_size() == 0, "a running request still holds a cached prefix"
        self._cache.reset()

    def release_memory(self) -> None:
        """Free the KV pool's memory (no request may hold KV); resume_memory brings it back, zeroed."""
        self.drop_cache()
        self.kv_pool.release()

    def resume_memory(self) -> None:
        self.kv_pool.resume()

    def reset(self) -> None:
        """Everything free again (no request may hold KV)."""
        self._cache.reset()
        self._allocator.reset()
        self._req_pool.reset()
