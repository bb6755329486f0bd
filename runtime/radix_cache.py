"""Page-aware radix tree mapping token-id prefixes to the KV cache slots that hold them."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from collections.abc import Hashable, Iterator

import torch

from runtime.page_allocator import PageAllocator


@dataclass(eq=False)
class TreeNode:
    key: list[int]
    value: torch.Tensor  # int64 KV slots, one per token of `key`
    parent: TreeNode | None
    children: dict[Hashable, TreeNode] = field(default_factory=dict)
    lock_ref: int = 0  # requests using this node (or a descendant); locked nodes are never evicted
    last_access: int = 0
    evicted: bool = False


@dataclass
class MatchResult:
    slots: torch.Tensor  # int64, length a multiple of page_size
    last_node: TreeNode


class RadixCache:
    """Prefix cache whose keys are split only at page boundaries.

    Slot ownership: slots stored in the tree belong to the tree. `insert` returns how much of
    the key was already cached; the caller then frees its own copies of that range (except any
    part it got from `match_prefix`, which already is the tree's) and keeps everything past the
    page-aligned end. Whether to cache at all is the caller's choice (runtime/cache_manager.py).
    """

    def __init__(self, allocator: PageAllocator, page_size: int = 1):
        if allocator.page_size != page_size:
            raise ValueError(f"allocator page_size {allocator.page_size} != cache page_size {page_size}")
        self.allocator = allocator
        self.page_size = page_size
        self._init_tree()

    def _init_tree(self) -> None:
        empty = torch.empty(0, dtype=torch.int64, device=self.allocator.device)
        self.root = TreeNode(key=[], value=empty, parent=None)
        self._clock = 0  # monotonic LRU clock, one tick per match/insert
        self._evictable = 0
        self._protected = 0
        self._num_nodes = 0
        # Lazy min-heap of (last_access, seq, node); entries whose time no longer matches the
        # node, or whose node is no longer an unlocked leaf, are skipped when popped.
        self._heap: list[tuple[int, int, TreeNode]] = []
        self._heap_seq = 0

    # ---- sizes -------------------------------------------------------------------------

    def evictable_size(self) -> int:
        return self._evictable

    def protected_size(self) -> int:
        return self._protected

    def total_size(self) -> int:
        return self._evictable + self._protected

    # ---- lookup / insert ---------------------------------------------------------------

    def match_prefix(self, token_ids: list[int]) -> MatchResult:
        """Longest cached page-aligned prefix; the matched path counts as recently used."""
        token_ids = token_ids if isinstance(token_ids, list) else list(token_ids)
        end = len(token_ids) - len(token_ids) % self.page_size
        self._clock += 1
        node, pos, values = self.root, 0, []
        while pos < end:
            child = node.children.get(self._child_key(token_ids, pos))
            if child is None:
                break
            n = self._common_len(child.key, token_ids, pos)
            if n < len(child.key):
                # Split so the returned node ends exactly at the match; locking it then
                # protects only what the caller uses.
                child = self._split(child, n)
            self._touch(child)
            values.append(child.value)
            pos += n
            node = child
        # Always a fresh tensor, so callers may write into it without touching the tree.
        slots = torch.cat(values) if values else self.root.value.clone()
        return MatchResult(slots, node)

    def insert(self, token_ids: list[int], slots: torch.Tensor) -> int:
        """Cache the page-aligned part of `token_ids` -> `slots`; returns the length already cached."""
        token_ids = token_ids if isinstance(token_ids, list) else list(token_ids)
        end = len(token_ids) - len(token_ids) % self.page_size
        assert slots.numel() >= end, "fewer slots than tokens"
        self._clock += 1
        node, pos = self.root, 0
        while pos < end:
            child = node.children.get(self._child_key(token_ids, pos))
            if child is None:
                leaf = TreeNode(
                    key=token_ids[pos:end],
                    value=slots[pos:end].to(self.allocator.device, torch.int64, copy=True),
                    parent=node,
                    last_access=self._clock,
                )
                node.children[self._child_key(leaf.key, 0)] = leaf
                self._num_nodes += 1
                self._evictable += end - pos
                self._push(leaf)
                return pos
            n = self._common_len(child.key, token_ids, pos)
            if n < len(child.key):
                child = self._split(child, n)
            self._touch(child)
            pos += n
            node = child
        return end

    # ---- locking -----------------------------------------------------------------------

    def inc_lock(self, node: TreeNode) -> None:
        """Protect `node` and its ancestors from eviction while a request uses that prefix."""
        assert not node.evicted, "locking an evicted node"
        while node is not self.root:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def dec_lock(self, node: TreeNode) -> None:
        while node is not self.root:
            assert node.lock_ref > 0, "unbalanced dec_lock"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._evictable += len(node.key)
                self._protected -= len(node.key)
                self._push(node)
            node = node.parent

    # ---- eviction ----------------------------------------------------------------------

    def evict(self, num_tokens: int) -> int:
        """Evict least-recently-used unlocked leaves until `num_tokens` are freed; returns tokens freed."""
        freed, values = 0, []
        while freed < num_tokens and self._heap:
            stamp, _, node = heapq.heappop(self._heap)
            if stamp != node.last_access or not self._is_evictable_leaf(node):
                continue
            parent = node.parent
            del parent.children[self._child_key(node.key, 0)]
            node.evicted = True
            self._num_nodes -= 1
            self._evictable -= len(node.key)
            freed += len(node.key)
            values.append(node.value)
            if parent is not self.root:
                self._push(parent)
        if values:
            self.allocator.free_slots(torch.cat(values))
        return freed

    def reset(self) -> None:
        """Drop every node and give all its slots back to the allocator (no locks may be held)."""
        assert self._protected == 0, "reset while prefixes are locked"
        values = [node.value for node in self._nodes()]
        if values:
            self.allocator.free_slots(torch.cat(values))
        self._init_tree()

    # ---- integrity ---------------------------------------------------------------------

    def check_integrity(self) -> None:
        ps = self.page_size
        evictable = protected = count = 0
        all_slots = []
        offsets = torch.arange(ps, device=self.allocator.device)
        for node in self._nodes():
            count += 1
            assert not node.evicted, "evicted node still in tree"
            assert node.parent is not None and node.parent.children.get(self._child_key(node.key, 0)) is node, (
                "broken parent link"
            )
            assert len(node.key) > 0 and len(node.key) % ps == 0, "node key not page aligned"
            assert node.value.dtype == torch.int64 and node.value.numel() == len(node.key), "value/key length mismatch"
            pages = node.value.view(-1, ps)
            assert bool((pages[:, 0] % ps == 0).all()), "page does not start at offset 0"
            assert bool((pages - pages[:, :1] == offsets).all()), "page slots not contiguous"
            assert node.lock_ref >= sum(c.lock_ref for c in node.children.values()), "child locked more than parent"
            assert node.lock_ref >= 0
            if node.lock_ref > 0:
                protected += len(node.key)
            else:
                evictable += len(node.key)
            all_slots.append(node.value)
        assert (evictable, protected) == (self._evictable, self._protected), "size counters out of sync"
        assert count == self._num_nodes, "node count out of sync"
        if all_slots:
            slots = torch.cat(all_slots)
            assert torch.unique(slots).numel() == slots.numel(), "slot stored twice"
        # Every evictable leaf must be reachable from the heap, or evict would miss it.
        queued = {id(n) for stamp, _, n in self._heap if stamp == n.last_access}
        for node in self._nodes():
            if self._is_evictable_leaf(node):
                assert id(node) in queued, "evictable leaf missing from eviction heap"

    # ---- internals ---------------------------------------------------------------------

    def _child_key(self, key: list[int], pos: int) -> Hashable:
        return key[pos] if self.page_size == 1 else tuple(key[pos : pos + self.page_size])

    def _common_len(self, node_key: list[int], key: list[int], pos: int) -> int:
        """Page-aligned length of the common prefix of `node_key` and `key[pos:]`."""
        n = len(node_key)
        if key[pos : pos + n] == node_key:
            return n
        limit = min(n, len(key) - pos)
        i = 0
        while i < limit and node_key[i] == key[pos + i]:
            i += 1
        return i - i % self.page_size

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut `child` after `n` tokens; returns the new upper node (same lock count and age)."""
        parent = child.parent
        mid = TreeNode(
            key=child.key[:n],
            value=child.value[:n],
            parent=parent,
            children={},
            lock_ref=child.lock_ref,
            last_access=child.last_access,
        )
        parent.children[self._child_key(child.key, 0)] = mid
        child.key, child.value, child.parent = child.key[n:], child.value[n:], mid
        mid.children[self._child_key(child.key, 0)] = child
        self._num_nodes += 1
        return mid

    def _touch(self, node: TreeNode) -> None:
        node.last_access = self._clock
        self._push(node)

    def _is_evictable_leaf(self, node: TreeNode) -> bool:
        return not node.evicted and not node.children and node.lock_ref == 0 and node is not self.root

    def _push(self, node: TreeNode) -> None:
        if not self._is_evictable_leaf(node):
            return
        if len(self._heap) > 2 * self._num_nodes + 1024:
            # Too many stale entries: rebuild from the live leaves.
            leaves = [n for n in self._nodes() if self._is_evictable_leaf(n)]
            self._heap = [(n.last_access, i, n) for i, n in enumerate(leaves)]
            heapq.heapify(self._heap)
            self._heap_seq = len(self._heap)
        self._heap_seq += 1
        heapq.heappush(self._heap, (node.last_access, self._heap_seq, node))

    def _nodes(self) -> Iterator[TreeNode]:
        """All nodes except the root."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            yield node
