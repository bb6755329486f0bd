"""Bucketing: many tensors in one flat buffer and back, and splitting a parameter list by size."""

from __future__ import annotations

import pytest
import torch

from sync.bucket import ALIGN, BucketMeta, flatten_bucket, layout_bucket, plan_buckets, unflatten_bucket
from sync.specs import TensorSpecs, nbytes_of, parse_dtype


def _mixed() -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        ("a", torch.randn(3, 5, generator=gen)),
        ("b", torch.randn(7, generator=gen).bfloat16()),
        ("scalar", torch.tensor(2.5, dtype=torch.float64)),
        ("empty", torch.zeros(0, 4)),
        ("c", torch.randn(2, 3, 3, generator=gen).half()),
        ("transposed", torch.randn(4, 6, generator=gen).t()),  # not contiguous
        ("ids", torch.arange(5, dtype=torch.int64)),
    ]


def _assert_same(named, out) -> None:
    assert [n for n, _ in out] == [n for n, _ in named]
    for (name, t), (_, u) in zip(named, out):
        assert u.dtype == t.dtype and u.shape == t.shape and torch.equal(u, t), name


def test_round_trip_mixed_dtypes_and_shapes() -> None:
    named = _mixed()
    flat, meta = flatten_bucket(named)
    assert flat.dtype == torch.uint8 and meta.buffer_dtype == "uint8" and flat.numel() == meta.numel
    assert all(off % ALIGN == 0 for off in meta.offsets)
    _assert_same(named, unflatten_bucket(flat, meta))
    # The receiver sees only names, dtypes, shapes (a request) and must derive the same layout.
    assert layout_bucket(meta.specs()) == meta
    received = flat.clone()  # as if broadcast into a fresh buffer
    _assert_same(named, unflatten_bucket(received, layout_bucket(meta.specs())))


def test_uniform_bucket_is_a_packed_typed_buffer() -> None:
    named = [(n, t.to(torch.bfloat16)) for n, t in _mixed()]
    flat, meta = flatten_bucket(named)
    # SGLang's flattened_bucket layout: same dtype, tensors back to back, offsets in elements.
    assert flat.dtype == torch.bfloat16 and meta.buffer_dtype == "bfloat16"
    assert torch.equal(flat, torch.cat([t.reshape(-1) for _, t in named]))
    sizes = [t.numel() for _, t in named]
    assert meta.offsets == [sum(sizes[:i]) for i in range(len(sizes))]
    _assert_same(named, unflatten_bucket(flat, meta))


def test_unflatten_returns_views_and_checks_the_buffer() -> None:
    flat, meta = flatten_bucket(_mixed())
    out = dict(unflatten_bucket(flat, meta))
    flat.zero_()
    assert not out["a"].any()
    with pytest.raises(ValueError, match="metadata says"):
        unflatten_bucket(flat[:-1], meta)
    with pytest.raises(ValueError, match="metadata says"):
        unflatten_bucket(flat.view(torch.int8), meta)


def test_single_contiguous_tensor_is_not_copied() -> None:
    t = torch.randn(4, 4)
    flat, meta = flatten_bucket([("w", t)])
    assert flat.data_ptr() == t.data_ptr() and meta.numel == 16


def test_meta_is_a_msgspec_struct() -> None:
    import msgspec

    _, meta = flatten_bucket(_mixed())
    assert msgspec.json.decode(msgspec.json.encode(meta), type=BucketMeta) == meta
    with pytest.raises(ValueError, match="differ in length"):
        TensorSpecs(["a"], [], [[1]])
    with pytest.raises(ValueError, match="at least one"):
        layout_bucket(TensorSpecs([], [], []))


def _specs(n: int, seed: int) -> list[tuple[str, list[int], torch.dtype]]:
    gen = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.bfloat16]
    out = []
    for i in range(n):
        shape = [int(torch.randint(1, 40, (1,), generator=gen)), int(torch.randint(1, 40, (1,), generator=gen))]
        out.append((f"t{i}", shape, dtypes[int(torch.randint(0, 4, (1,), generator=gen)) == 0]))
    return out


@pytest.mark.parametrize("split_on_dtype", [True, False])
@pytest.mark.parametrize("limit", [1, 1000, 4096, 50_000, 10**9])
def test_plan_respects_the_limit(limit, split_on_dtype) -> None:
    specs = _specs(60, seed=limit)
    buckets = plan_buckets(specs, limit, split_on_dtype=split_on_dtype)
    assert [n for b in buckets for n in b.names] == [n for n, _, _ in specs]  # all, in order, once
    for b in buckets:
        if len(b.names) > 1:
            assert b.buffer_nbytes() <= limit
        if split_on_dtype:
            assert len(set(b.dtypes)) == 1
    # A tensor larger than the limit is alone.
    for name, shape, dtype in specs:
        if nbytes_of(shape, dtype) > limit:
            assert [name] in [b.names for b in buckets]
    # Buckets are full: the next tensor would not have fit (else it would have joined).
    by_name = {n: (s, d) for n, s, d in specs}
    for b, nxt in zip(buckets, buckets[1:]):
        shape, dtype = by_name[nxt.names[0]]
        if not split_on_dtype or dtype == parse_dtype(b.dtypes[-1]):
            used = b.buffer_nbytes() if split_on_dtype else -(-b.buffer_nbytes() // ALIGN) * ALIGN  # + padding
            assert used + nbytes_of(shape, dtype) > limit
    if limit == 10**9 and not split_on_dtype:
        assert len(buckets) == 1


def test_plan_with_tensors_larger_than_the_limit() -> None:
    specs = [("small1", [10], "float32"), ("huge", [1000], "float32"), ("small2", [10], "float32"),
             ("small3", [10], "float32")]
    assert [b.names for b in plan_buckets(specs, 100)] == [["small1"], ["huge"], ["small2", "small3"]]
    with pytest.raises(ValueError, match="positive"):
        plan_buckets(specs, 0)
