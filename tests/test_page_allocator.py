import random

import pytest
import torch

from runtime.page_allocator import PageAllocator


def pages_of(slots: torch.Tensor, page_size: int) -> set[int]:
    return set((slots // page_size).tolist())


@pytest.mark.parametrize("page_size", [1, 4])
def test_alloc_free_round_trip(page_size: int) -> None:
    alloc = PageAllocator(num_pages=10, page_size=page_size)
    assert alloc.available_pages() == 10
    assert alloc.available_tokens() == 10 * page_size
    a = alloc.alloc_pages(3)
    b = alloc.alloc_pages(7)
    assert a.dtype == torch.int64 and a.numel() == 3 and b.numel() == 7
    assert sorted(torch.cat([a, b]).tolist()) == list(range(10))
    assert alloc.available_pages() == 0
    assert alloc.alloc_pages(1) is None
    alloc.free_slots(a * page_size)
    assert alloc.available_pages() == 3
    again = alloc.alloc_pages(3)
    assert sorted(again.tolist()) == sorted(a.tolist())
    alloc.free_slots(again * page_size)
    alloc.free_slots(b * page_size)
    assert alloc.available_pages() == 10
    assert alloc.alloc_pages(0).numel() == 0


def test_free_slots_ignores_non_first_slots() -> None:
    alloc = PageAllocator(num_pages=4, page_size=4)
    slots = alloc.alloc_tokens(0, -1, 10)  # 3 pages, last one half full
    assert alloc.available_pages() == 1
    alloc.free_slots(slots)
    assert alloc.available_pages() == 4


def test_alloc_tokens_fills_partial_last_page() -> None:
    alloc = PageAllocator(num_pages=5, page_size=4)
    first = alloc.alloc_tokens(0, -1, 6)
    p0, p1 = first[0].item() // 4, first[4].item() // 4
    assert first.tolist() == [4 * p0 + i for i in range(4)] + [4 * p1, 4 * p1 + 1]
    assert alloc.available_pages() == 3
    more = alloc.alloc_tokens(6, int(first[-1]), 3)
    p2 = more[2].item() // 4
    assert more.tolist() == [4 * p1 + 2, 4 * p1 + 3, 4 * p2]
    assert p2 not in (p0, p1)
    assert alloc.available_pages() == 2
    # Filling the rest of a partial page needs no free page at all.
    alloc.alloc_pages(2)
    assert alloc.alloc_tokens(9, int(more[-1]), 3).tolist() == [4 * p2 + 1, 4 * p2 + 2, 4 * p2 + 3]
    assert alloc.alloc_tokens(12, 4 * p2 + 3, 1) is None
    assert alloc.alloc_tokens(5, 0, 0).numel() == 0


def test_alloc_tokens_exhausted_allocates_nothing() -> None:
    alloc = PageAllocator(num_pages=3, page_size=4)
    slots = alloc.alloc_tokens(0, -1, 5)
    assert alloc.alloc_tokens(5, int(slots[-1]), 8) is None  # 3 in last page + 2 pages > 1 free
    assert alloc.available_pages() == 1
    assert alloc.alloc_tokens(5, int(slots[-1]), 7).numel() == 7
    assert alloc.available_pages() == 0


@pytest.mark.parametrize("page_size", [1, 4])
def test_alloc_decode(page_size: int) -> None:
    alloc = PageAllocator(num_pages=32, page_size=page_size)
    lens = [1, 4, 3, 8, 2]
    reqs = [alloc.alloc_tokens(0, -1, n) for n in lens]
    before = alloc.available_pages()
    cur_lens = torch.tensor(lens)
    last = torch.stack([r[-1] for r in reqs])
    out = alloc.alloc_decode(cur_lens, last)
    assert out.dtype == torch.int64 and out.numel() == len(lens)
    for n, r, s in zip(lens, reqs, out.tolist()):
        if n % page_size == 0:
            assert s % page_size == 0 and s // page_size not in pages_of(torch.cat(reqs), page_size)
        else:
            assert s == int(r[-1]) + 1
    new_pages = sum(n % page_size == 0 for n in lens)
    assert alloc.available_pages() == before - new_pages
    assert len(set(out.tolist())) == len(lens)


def test_alloc_decode_exhausted_allocates_nothing() -> None:
    alloc = PageAllocator(num_pages=3, page_size=2)
    a, b = alloc.alloc_tokens(0, -1, 2), alloc.alloc_tokens(0, -1, 2)
    assert alloc.available_pages() == 1
    cur_lens, last = torch.tensor([2, 2]), torch.stack([a[-1], b[-1]])
    assert alloc.alloc_decode(cur_lens, last) is None
    assert alloc.available_pages() == 1
    assert alloc.alloc_decode(cur_lens[:1], last[:1]).numel() == 1
    assert alloc.available_pages() == 0


@pytest.mark.parametrize("page_size", [1, 4])
def test_double_free_raises(page_size: int) -> None:
    alloc = PageAllocator(num_pages=6, page_size=page_size)
    pages = alloc.alloc_pages(3)
    alloc.free_slots(pages[:2] * page_size)
    with pytest.raises(AssertionError):
        alloc.free_slots(pages[1:] * page_size)
    # The rejected call changed nothing: page 3 can still be freed exactly once.
    assert alloc.available_pages() == 5
    alloc.free_slots(pages[2:] * page_size)
    assert alloc.available_pages() == 6
    with pytest.raises(AssertionError):
        alloc.free_slots(pages[:1] * page_size)
    fresh = alloc.alloc_pages(1)
    with pytest.raises(AssertionError):
        alloc.free_slots(torch.cat([fresh, fresh]) * page_size)  # duplicate inside one call
    assert alloc.available_pages() == 5


def test_free_copies_caller_tensor() -> None:
    alloc = PageAllocator(num_pages=4)
    table = alloc.alloc_pages(4)
    alloc.free_slots(table[:2])
    table[:2] = table[2:]  # caller reuses its buffer
    got = alloc.alloc_pages(2)
    assert set(got.tolist()).isdisjoint(table[2:].tolist())


def test_reset() -> None:
    alloc = PageAllocator(num_pages=5, page_size=2)
    alloc.alloc_tokens(0, -1, 7)
    alloc.reset()
    assert alloc.available_pages() == 5
    assert sorted(alloc.alloc_pages(5).tolist()) == list(range(5))


@pytest.mark.parametrize("page_size", [1, 4])
def test_random_request_lifecycles(page_size: int) -> None:
    rng = random.Random(page_size)
    num_pages = 64
    alloc = PageAllocator(num_pages=num_pages, page_size=page_size)
    active: list[list[int]] = []  # slot lists of running requests
    started = 0

    def check() -> None:
        held = [s for r in active for s in r]
        assert len(held) == len(set(held)), "slot handed out twice"
        first_slots = [s for s in held if s % page_size == 0]
        assert alloc.available_pages() + len(first_slots) == num_pages
        for r in active:  # each request starts at offset 0 and fills its pages in order
            assert all(s == r[i - i % page_size] + i % page_size for i, s in enumerate(r))

    while started < 1000 or active:
        op = rng.random()
        if started < 1000 and op < 0.3:
            slots = alloc.alloc_tokens(0, -1, rng.randint(1, 12))
            if slots is not None:
                active.append(slots.tolist())
                started += 1
        elif op < 0.55 and active:
            r = active[rng.randrange(len(active))]
            more = alloc.alloc_tokens(len(r), r[-1], rng.randint(0, 9))
            if more is not None:
                r.extend(more.tolist())
        elif op < 0.8 and active:
            batch = rng.sample(active, rng.randint(1, len(active)))
            out = alloc.alloc_decode(torch.tensor([len(r) for r in batch]), torch.tensor([r[-1] for r in batch]))
            if out is not None:
                for r, s in zip(batch, out.tolist()):
                    r.append(s)
        elif active:
            # Finish or abort: either way the whole slot list goes back.
            alloc.free_slots(torch.tensor(active.pop(rng.randrange(len(active)))))
        check()
    assert alloc.available_pages() == num_pages
    assert sorted(alloc.alloc_pages(num_pages).tolist()) == list(range(num_pages))
