import random
from dataclasses import dataclass

import pytest
import torch

from runtime.page_allocator import PageAllocator
from runtime.radix_cache import RadixCache, TreeNode

Key = tuple[int, ...]


class Oracle:
    """Brute-force model of a page-aware prefix cache: one entry per cached page, keyed by the
    whole page-aligned prefix ending with that page."""

    def __init__(self, page_size: int) -> None:
        self.ps = page_size
        self.pages: dict[Key, list[int]] = {}  # prefix -> slots of its last page
        self.time: dict[Key, int] = {}
        self.locks: dict[Key, int] = {}
        self.clock = 0

    def _prefixes(self, ids: list[int], length: int) -> list[Key]:
        return [tuple(ids[:k]) for k in range(self.ps, length + 1, self.ps)]

    def match(self, ids: list[int]) -> list[int]:
        self.clock += 1
        slots: list[int] = []
        for key in self._prefixes(ids, len(ids)):
            if key not in self.pages:
                break
            slots += self.pages[key]
            self.time[key] = self.clock
        return slots

    def insert(self, ids: list[int], slots: list[int]) -> int:
        self.clock += 1
        end = len(ids) - len(ids) % self.ps
        cached = end
        for key in self._prefixes(ids, end):
            if key not in self.pages:
                cached = min(cached, len(key) - self.ps)
                self.pages[key] = slots[len(key) - self.ps : len(key)]
                self.locks[key] = 0
            self.time[key] = self.clock
        return cached

    def lock(self, ids: list[int], length: int, delta: int) -> None:
        for key in self._prefixes(ids, length):
            self.locks[key] += delta
            assert self.locks[key] >= 0

    def evictable_leaves(self) -> list[Key]:
        parents = {key[: -self.ps] for key in self.pages}
        return [k for k in self.pages if k not in parents and self.locks[k] == 0]

    def remove(self, keys: set[Key]) -> None:
        for key in keys:
            del self.pages[key], self.time[key], self.locks[key]


def tree_pages(cache: RadixCache) -> tuple[dict[Key, list[int]], dict[Key, int]]:
    """Tree contents in the oracle's form: prefix -> page slots, prefix -> lock count."""
    ps = cache.page_size
    pages: dict[Key, list[int]] = {}
    locks: dict[Key, int] = {}
    stack: list[tuple[tuple[int, ...], TreeNode]] = [((), cache.root)]
    while stack:
        prefix, node = stack.pop()
        for child in node.children.values():
            values = child.value.tolist()
            for i in range(0, len(child.key), ps):
                key = prefix + tuple(child.key[: i + ps])
                pages[key] = values[i : i + ps]
                locks[key] = child.lock_ref
            stack.append((prefix + tuple(child.key), child))
    return pages, locks


@dataclass
class Request:
    ids: list[int]
    slots: list[int]
    cached: int  # slots[:cached] are the tree's (from match_prefix), the rest the caller's
    node: TreeNode


class Harness:
    def __init__(self, page_size: int, num_pages: int, seed: int) -> None:
        self.ps = page_size
        self.num_pages = num_pages
        self.rng = random.Random(seed)
        self.alloc = PageAllocator(num_pages, page_size)
        self.cache = RadixCache(self.alloc, page_size)
        self.oracle = Oracle(page_size)
        self.reqs: list[Request] = []
        vocab = 3 if page_size == 1 else 2
        self.vocab = vocab
        self.bases = [[self.rng.randrange(vocab) for _ in range(48)] for _ in range(5)]

    def gen_ids(self) -> list[int]:
        rng = self.rng
        ids = list(rng.choice(self.bases)[: rng.randint(0, 28)])
        if ids and rng.random() < 0.4:
            ids[rng.randrange(len(ids))] = rng.randrange(self.vocab)
        if rng.random() < 0.4:
            ids += [rng.randrange(self.vocab) for _ in range(rng.randint(1, 8))]
        return ids

    # ---- checks -----------------------------------------------------------------------

    def check(self) -> None:
        cache, oracle, ps = self.cache, self.oracle, self.ps
        cache.check_integrity()
        pages, locks = tree_pages(cache)
        assert pages == oracle.pages
        assert locks == oracle.locks
        n_locked = sum(1 for v in oracle.locks.values() if v > 0)
        assert cache.protected_size() == n_locked * ps
        assert cache.evictable_size() == (len(oracle.pages) - n_locked) * ps
        assert cache.total_size() == len(oracle.pages) * ps
        caller_pages = sum(1 for r in self.reqs for s in r.slots[r.cached :] if s % ps == 0)
        assert self.alloc.available_pages() + len(pages) + caller_pages == self.num_pages

    def match(self, ids: list[int]):
        m = self.cache.match_prefix(ids)
        expected = self.oracle.match(ids)
        assert m.slots.dtype == torch.int64
        assert m.slots.tolist() == expected
        return m

    def evict(self, num_tokens: int) -> int:
        cache, oracle = self.cache, self.oracle
        before = dict(oracle.pages)
        freed = cache.evict(num_tokens)
        after, _ = tree_pages(cache)
        gone = set(before) - set(after)
        assert set(after) <= set(before)
        assert freed == len(gone) * self.ps
        assert freed >= num_tokens or cache.evictable_size() == 0
        assert all(oracle.locks[k] == 0 for k in gone), "evicted a locked page"
        assert all(k[: -self.ps] in after for k in after if len(k) > self.ps), "evicted an inner page"
        newest_gone = max((oracle.time[k] for k in gone), default=-1)
        oracle.remove(gone)
        leaves = oracle.evictable_leaves()
        # Eviction pops leaves in age order, so nothing still evictable may be older.
        assert not leaves or newest_gone <= min(oracle.time[k] for k in leaves), "not LRU"
        return freed

    # ---- caller side ------------------------------------------------------------------

    def alloc_tokens(self, cur_len: int, last_slot: int, n: int) -> list[int] | None:
        slots = self.alloc.alloc_tokens(cur_len, last_slot, n)
        if slots is None:
            self.evict(n)
            slots = self.alloc.alloc_tokens(cur_len, last_slot, n)
        return None if slots is None else slots.tolist()

    def release_after_insert(self, r: Request) -> int:
        """Insert the request's tokens; free its duplicates and unaligned tail; returns end."""
        n = self.cache.insert(r.ids, torch.tensor(r.slots, dtype=torch.int64))
        assert n == self.oracle.insert(r.ids, r.slots)
        assert r.cached <= n
        self.alloc.free_slots(torch.tensor(r.slots[r.cached : n], dtype=torch.int64))
        return len(r.ids) - len(r.ids) % self.ps

    def step(self) -> None:
        rng, cache, oracle, ps = self.rng, self.cache, self.oracle, self.ps
        op = rng.random()
        if op < 0.25 and len(self.reqs) < 4:  # start a request on its cached prefix
            ids = self.gen_ids()
            m = self.match(ids)
            cache.inc_lock(m.last_node)
            oracle.lock(ids, len(m.slots), +1)
            slots = m.slots.tolist()
            last = slots[-1] if slots else -1
            more = self.alloc_tokens(len(slots), last, len(ids) - len(slots))
            if more is None:
                cache.dec_lock(m.last_node)
                oracle.lock(ids, len(m.slots), -1)
            else:
                self.reqs.append(Request(ids, slots + more, len(slots), m.last_node))
        elif op < 0.35 and self.reqs:  # decode / extend
            r = rng.choice(self.reqs)
            k = rng.randint(1, 5)
            more = self.alloc_tokens(len(r.slots), r.slots[-1] if r.slots else -1, k)
            if more is not None:
                r.ids += [rng.randrange(self.vocab) for _ in range(k)]
                r.slots += more
        elif op < 0.45 and self.reqs:  # finish: cache everything, drop the lock
            r = self.reqs.pop(rng.randrange(len(self.reqs)))
            end = self.release_after_insert(r)
            self.alloc.free_slots(torch.tensor(r.slots[end:], dtype=torch.int64))
            cache.dec_lock(r.node)
            oracle.lock(r.ids, r.cached, -1)
        elif op < 0.52 and self.reqs:  # checkpoint a running request (chunked prefill)
            r = rng.choice(self.reqs)
            end = self.release_after_insert(r)
            m = self.match(r.ids)
            assert len(m.slots) == end
            cache.inc_lock(m.last_node)
            oracle.lock(r.ids, end, +1)
            cache.dec_lock(r.node)
            oracle.lock(r.ids, r.cached, -1)
            r.slots[:end] = m.slots.tolist()
            r.cached, r.node = end, m.last_node
        elif op < 0.57 and self.reqs:  # abort: nothing cached
            r = self.reqs.pop(rng.randrange(len(self.reqs)))
            self.alloc.free_slots(torch.tensor(r.slots[r.cached :], dtype=torch.int64))
            cache.dec_lock(r.node)
            oracle.lock(r.ids, r.cached, -1)
        elif op < 0.72:  # lookup only
            self.match(self.gen_ids())
        elif op < 0.87:  # insert fresh slots without a prior match
            ids = self.gen_ids()
            slots = self.alloc_tokens(0, -1, len(ids))
            if slots is not None:
                r = Request(ids, slots, 0, cache.root)
                end = self.release_after_insert(r)
                self.alloc.free_slots(torch.tensor(slots[end:], dtype=torch.int64))
        elif op < 0.995:
            self.evict(rng.randint(1, 6 * ps))
        elif not self.reqs:
            cache.reset()
            oracle.remove(set(oracle.pages))
            assert self.alloc.available_pages() == self.num_pages
        self.check()


@pytest.mark.parametrize("page_size,num_pages,seed", [(1, 48, 0), (1, 96, 1), (4, 16, 2), (4, 40, 3)])
def test_random_ops_against_oracle(page_size: int, num_pages: int, seed: int) -> None:
    h = Harness(page_size, num_pages, seed)
    for _ in range(3000):
        h.step()
    while h.reqs:  # wind down: everything goes back
        r = h.reqs.pop()
        h.alloc.free_slots(torch.tensor(r.slots[r.cached :], dtype=torch.int64))
        h.cache.dec_lock(r.node)
        h.oracle.lock(r.ids, r.cached, -1)
    h.check()
    h.cache.reset()
    assert h.alloc.available_pages() == num_pages
    assert h.cache.total_size() == 0


def fresh(alloc: PageAllocator, n: int) -> torch.Tensor:
    return alloc.alloc_tokens(0, -1, n)


@pytest.mark.parametrize("page_size", [1, 4])
def test_insert_stores_only_aligned_part(page_size: int) -> None:
    alloc = PageAllocator(32, page_size)
    cache = RadixCache(alloc, page_size)
    ids = list(range(10))
    slots = fresh(alloc, 10)
    assert cache.insert(ids, slots) == 0
    end = 10 - 10 % page_size
    assert cache.total_size() == end
    m = cache.match_prefix(ids + [99])
    assert m.slots.tolist() == slots[:end].tolist()
    assert cache.insert(ids, fresh(alloc, 10)) == end
    # A branch mid-way reports the shared page-aligned prefix.
    other = ids[:6] + [50, 51, 52, 53]
    assert cache.insert(other, fresh(alloc, 10)) == 6 - 6 % page_size
    cache.check_integrity()


def test_split_inherits_lock() -> None:
    alloc = PageAllocator(32, 2)
    cache = RadixCache(alloc, 2)
    cache.insert([1, 2, 3, 4, 5, 6], fresh(alloc, 6))
    full = cache.match_prefix([1, 2, 3, 4, 5, 6])
    cache.inc_lock(full.last_node)
    assert cache.protected_size() == 6
    # Matching half the node splits it; both halves stay locked by the one request.
    half = cache.match_prefix([1, 2, 3, 4, 9, 9])
    assert half.slots.tolist() == full.slots[:4].tolist()
    assert half.last_node.lock_ref == 1 and full.last_node.parent is half.last_node
    cache.check_integrity()
    assert cache.evict(100) == 0
    cache.dec_lock(full.last_node)
    assert cache.protected_size() == 0 and cache.evictable_size() == 6
    cache.check_integrity()
    assert cache.evict(100) == 6
    assert alloc.available_pages() == 32


def test_locked_nodes_are_never_evicted() -> None:
    alloc = PageAllocator(64)
    cache = RadixCache(alloc)
    cache.insert([1, 2, 3], fresh(alloc, 3))
    dup = fresh(alloc, 4)
    assert cache.insert([1, 2, 4, 5], dup) == 2
    alloc.free_slots(dup[:2])  # the caller's copy of the already cached [1, 2]
    cache.insert([7, 8], fresh(alloc, 2))
    m = cache.match_prefix([1, 2, 4, 5])
    cache.inc_lock(m.last_node)
    assert cache.protected_size() == 4
    assert cache.evict(1000) == 3  # [3] and [7, 8]; the locked path [1, 2] -> [4, 5] stays
    assert cache.match_prefix([1, 2, 4, 5]).slots.numel() == 4
    cache.dec_lock(m.last_node)
    assert cache.evict(1000) == 4
    assert cache.total_size() == 0 and alloc.available_pages() == 64
    cache.check_integrity()


def test_evict_frees_least_recently_used_first() -> None:
    alloc = PageAllocator(64)
    cache = RadixCache(alloc)
    seqs = [[i, i + 10] for i in range(5)]
    for s in seqs:
        cache.insert(s, fresh(alloc, 2))
    cache.match_prefix(seqs[0])  # 0 becomes the newest
    cache.match_prefix(seqs[3] + [99])
    assert cache.evict(3) == 4  # whole leaves: oldest are 1 and 2
    remaining = [s for s in seqs if cache.match_prefix(s).slots.numel() == 2]
    assert remaining == [seqs[0], seqs[3], seqs[4]]
    # A parent whose children are gone becomes evictable in turn, after newer leaves.
    cache.reset()
    cache.insert([1, 2], fresh(alloc, 2))
    cache.insert([1, 2, 3], fresh(alloc, 3))
    cache.insert([5], fresh(alloc, 1))
    assert cache.evict(1) == 1  # leaf [3]
    assert cache.evict(1) == 2  # its parent [1, 2] is now a leaf, and older than [5]
    assert cache.match_prefix([5]).slots.numel() == 1
    assert cache.match_prefix([1, 2]).slots.numel() == 0


def test_reset_returns_every_page() -> None:
    alloc = PageAllocator(20, 4)
    cache = RadixCache(alloc, 4)
    for i in range(4):
        cache.insert([i] * 9, fresh(alloc, 9))  # tail pages stay with the "caller"
    assert alloc.available_pages() == 20 - 12
    cache.reset()
    assert alloc.available_pages() == 20 - 4
    assert cache.total_size() == 0 and cache.match_prefix([0] * 8).slots.numel() == 0
    cache.check_integrity()


def test_many_stale_heap_entries_are_compacted() -> None:
    alloc = PageAllocator(8)
    cache = RadixCache(alloc)
    cache.insert([1, 2], fresh(alloc, 2))
    for _ in range(5000):
        cache.match_prefix([1, 2])
    assert len(cache._heap) < 2000
    cache.check_integrity()
    assert cache.evict(1) == 2
