"""Checksums: exact (one element changes it), deterministic, order-sensitive digests."""

from __future__ import annotations

import torch

from sync.checksum import digest_of, named_checksums, tensor_checksum, update_digest


def test_one_element_changes_the_checksum() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        t = torch.randn(257, 33, generator=torch.Generator().manual_seed(0)).to(dtype)
        base = tensor_checksum(t)
        u = t.clone()
        bits = u.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize])
        bits[100, 7] ^= 1  # the next representable value: the smallest possible change
        assert not torch.equal(u, t)
        assert tensor_checksum(u) != base, dtype
        z = torch.zeros(8, dtype=dtype)
        z2 = z.clone()
        z2[3] = -0.0  # equal as numbers, different bits: a byte checksum sees it
        assert tensor_checksum(z2) != tensor_checksum(z)


def test_same_data_same_checksum() -> None:
    t = torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    assert tensor_checksum(t) == tensor_checksum(t.clone())
    assert tensor_checksum(t.t().contiguous().t()) == tensor_checksum(t)  # non-contiguous, same values
    assert tensor_checksum(t[5]) == tensor_checksum(t[5].clone())  # a view with a storage offset
    assert tensor_checksum(torch.tensor(3.0)) == tensor_checksum(torch.tensor([3.0]))
    assert tensor_checksum(torch.zeros(0)) == 0
    # A known value pins the definition: CRC-32 of the little-endian bytes.
    import zlib
    assert tensor_checksum(torch.tensor([1.0], dtype=torch.float32)) == zlib.crc32(b"\x00\x00\x80\x3f")


def test_digest_is_order_and_name_sensitive() -> None:
    gen = torch.Generator().manual_seed(2)
    named = [("a", torch.randn(4, generator=gen)), ("b", torch.randn(4, generator=gen))]
    d = digest_of(named)
    assert d == digest_of([(n, t.clone()) for n, t in named])
    assert d != digest_of(named[::-1])
    assert d != digest_of([("a", named[1][1]), ("b", named[0][1])])  # values swapped between names
    assert d != digest_of([("c", named[0][1]), ("b", named[1][1])])
    assert update_digest(named_checksums(named).items()) == d
    assert len(d) == 64


def test_cast_before_comparing() -> None:
    t = torch.randn(16).bfloat16()
    assert named_checksums([("w", t)], dtype=torch.float32) == {"w": tensor_checksum(t.float())}
