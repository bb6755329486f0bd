"""CacheManager against a naive reference, in random lifecycles of requests (no model).

Each slot's "KV" is written as what a real model's would depend on: the position, a hash of every token up
to it, and the weight version it was computed under. Oracles:
- a request reads back, at every position, the KV of its own tokens (a shared prefix is really its
  prefix; no slot was handed to two owners and overwritten), computed under the version it expects (a
  prefix from the cache always under the current weights: nothing from before an update is reused);
- pages in use == pages the cache holds + pages the requests own past their cached prefix;
- with a pool large enough that nothing is evicted, the matched prefix equals the longest page-aligned
  prefix that a set of every released or shared (non-stale) token sequence holds; with eviction, at most it;
- with prefix caching off, nothing is ever matched or kept;
- once every request is gone, every slot is free or cached, and the radix cache passes its own check.
"""

from __future__ import annotations

import random

import pytest
import torch

from runtime.cache_manager import CacheManager
from runtime.kv_pool import KVPool
from runtime.request import Request
from runtime.sampling_params import SamplingParams

HASH_MOD = 1_000_003  # hashes stay exact in float32


def _hashes(tokens: list[int]) -> list[int]:
    h, out = 0, []
    for t in tokens:
        h = (h * 31 + t + 1) % HASH_MOD
        out.append(h)
    return out


class Simulation:
    def __init__(self, seed: int, page_size: int, num_slots: int, prefix_caching: bool):
        self.rng = random.Random(seed)
        self.ps = page_size
        self.pool = KVPool(1, num_slots, 1, 3, torch.float32, "cpu")
        self.cm = CacheManager(self.pool, page_size, max_running_requests=8, context_len=96,
                               prefix_caching=prefix_caching)
        self.prefix_caching = prefix_caching
        self.roomy = num_slots >= 65536
        self.version = 0
        self.cached: set[tuple[int, ...]] = set()  # the reference: page-aligned prefixes the cache holds
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.versions: dict[str, list[int]] = {}  # per request, the version each computed position has
        self.bases = [[self.rng.randrange(50) for _ in range(64)] for _ in range(3)]
        self.count = 0

    # --- the reference --------------------------------------------------------------------------

    def _remember(self, req: Request) -> None:
        if self.prefix_caching and not req.kv_stale:
            fill = req.fill_ids[:req.kv_len]
            self.cached.update(tuple(fill[:k]) for k in range(self.ps, len(fill) + 1, self.ps))

    def _expected_match(self, fill: list[int]) -> int:
        k = 0
        while k + self.ps <= len(fill) and tuple(fill[:k + self.ps]) in self.cached:
            k += self.ps
        return k

    def _compute(self, req: Request, start: int, end: int) -> None:
        fill = req.fill_ids
        h = _hashes(fill[:end])
        values = torch.tensor([[p, h[p], self.version] for p in range(start, end)], dtype=torch.float32)
        self.pool.k_buffers[0][self.cm.slots(req, start, end)] = values[:, None, :]
        self.versions[req.rid][start:end] = [self.version] * (end - start)
        req.kv_len = end

    def check_request(self, req: Request) -> None:
        got = self.pool.k_buffers[0][self.cm.slots(req, 0, req.kv_len), 0]
        h = _hashes(req.fill_ids[:req.kv_len])
        assert got[:, 0].tolist() == list(range(req.kv_len)), req.rid
        assert got[:, 1].tolist() == h, req.rid
        assert got[:, 2].tolist() == self.versions[req.rid][:req.kv_len], req.rid

    def check_accounting(self) -> None:
        stats = self.cm.stats()
        owned = sum(-(-r.kv_len // self.ps) - r.prefix_len // self.ps for r in self.running) * self.ps
        assert stats["kv_used_tokens"] == stats["cache_tokens"] + owned
        if not self.prefix_caching:
            assert stats["cache_tokens"] == 0

    # --- operations -----------------------------------------------------------------------------

    def new_request(self) -> None:
        rng = self.rng
        ids = list(rng.choice(self.bases)[:rng.randint(1, 40)])
        ids += [rng.randrange(50) for _ in range(rng.randint(0, 12))]
        if not ids:
            ids = [1]
        self.count += 1
        req = Request(rid=f"r{self.count}", input_ids=ids, sampling_params=SamplingParams(), seed=0)
        self.versions[req.rid] = []
        self.waiting.append(req)

    def admit(self) -> None:
        if not self.waiting:
            return
        req = self.waiting[0]
        fill = req.fill_ids
        match = self.cm.match(req)
        matched = match.slots.shape[0]
        expected = self._expected_match(fill)
        assert matched == expected if self.roomy else matched <= expected
        limit = len(fill) - 1
        prefix = min(matched, limit - limit % self.ps)
        n = min(len(fill) - prefix, self.rng.randint(1, 24))
        if not self.cm.admit(req, match, prefix, n, reserve=0):
            return
        self.waiting.pop(0)
        self.running.append(req)
        self.versions[req.rid] = [self.version] * prefix + [-1] * (len(fill) + 64)
        self._compute(req, prefix, prefix + n)
        self.check_request(req)

    def advance(self, req: Request) -> None:
        if req.num_uncomputed > 1:  # a prefill chunk
            n = min(req.num_uncomputed, self.rng.randint(1, 24))
            if not self.cm.extend(req, n):
                return
            self._compute(req, req.kv_len, req.kv_len + n)
            if self.rng.random() < 0.5:
                self.cm.share_prefix(req)
                self._remember(req)
        else:  # a decode: sample a token, then compute it
            if req.num_uncomputed == 0:
                if len(req.fill_ids) >= 95:
                    return
                req.output_ids.append(self.rng.randrange(50))
            if not self.cm.ensure_decode_room([req]):
                return
            self.cm.alloc_decode([req])
            self._compute(req, req.kv_len, req.kv_len + 1)
        self.check_request(req)

    def release(self, req: Request, retract: bool) -> None:
        self._remember(req)
        self.cm.release(req)
        self.running.remove(req)
        assert req.kv_len == 0 and req.prefix_len == 0 and not req.kv_stale
        if retract:
            self.waiting.insert(0, req)

    def update_weights(self) -> None:
        for req in list(self.running):
            if not self.cm.detach_from_cache(req):
                self.release(req, retract=True)
        self.cm.drop_cache()
        self.cached.clear()
        self.version += 1

    def run(self, steps: int) -> None:
        rng = self.rng
        for _ in range(steps):
            x = rng.random()
            if x < 0.15 or not self.running and not self.waiting:
                self.new_request()
            elif x < 0.4:
                self.admit()
            elif x < 0.85 and self.running:
                self.advance(rng.choice(self.running))
            elif x < 0.97 and self.running:
                self.release(rng.choice(self.running), retract=rng.random() < 0.3)
            elif x >= 0.97:
                self.update_weights()
            self.check_accounting()
        for req in list(self.running):
            self.check_request(req)
            self.release(req, retract=False)
        assert self.cm.is_idle_clean()
        assert self.cm.stats()["kv_used_tokens"] == self.cm.cached_tokens()


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("num_slots", [128, 65536])
@pytest.mark.parametrize("seed", [0, 1])
def test_cache_manager_against_reference(seed, num_slots, page_size, prefix_caching):
    Simulation(seed, page_size, num_slots, prefix_caching).run(1000)


def test_prefix_caching_off_keeps_nothing():
    sim = Simulation(0, 1, 256, prefix_caching=False)
    sim.new_request()
    req = sim.waiting[0]
    sim.admit()
    sim.cm.share_prefix(req)
    assert req.prefix_len == 0 and sim.cm.cached_tokens() == 0
    sim.release(req, retract=False)
    assert sim.cm.stats()["kv_available_tokens"] == 256 and sim.cm.is_idle_clean()
    sim.new_request()
    sim.waiting[0].input_ids = list(req.input_ids)
    assert sim.cm.match(sim.waiting[0]).slots.numel() == 0


def test_reset_frees_everything():
    sim = Simulation(3, 4, 512, prefix_caching=True)
    sim.run(300)
    assert sim.cm.cached_tokens() > 0
    sim.cm.reset()
    stats = sim.cm.stats()
    assert stats["kv_available_tokens"] == stats["max_total_num_tokens"] == 512
    assert stats["cache_tokens"] == 0 and stats["req_pool_available"] == 8
