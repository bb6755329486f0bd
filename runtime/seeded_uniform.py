"""`seeded_uniform`: counter-based random numbers (splitmix64 in int64 tensor arithmetic), one per
(seed, step), so a sampled row's draw depends only on its own seed and position, never on the batch."""

from __future__ import annotations

import torch

_U64 = (1 << 64) - 1


def as_int64(value: int) -> int:
    """Reinterpret the low 64 bits of a Python int as a signed int64 (what a torch.long holds)."""
    value &= _U64
    return value - (1 << 64) if value >= (1 << 63) else value


_GOLDEN = as_int64(0x9E3779B97F4A7C15)
_MIX_A = as_int64(0xBF58476D1CE4E5B9)
_MIX_B = as_int64(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; splitmix64 needs the logical shift of the unsigned value.
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    # int64 multiplication wraps modulo 2**64, which is exactly the uint64 arithmetic splitmix wants.
    z = (z ^ _shift_right(z, 30)) * _MIX_A
    z = (z ^ _shift_right(z, 27)) * _MIX_B
    return z ^ _shift_right(z, 31)


def seeded_uniform(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One float64 in the open interval (0, 1) per (seed, step) pair, int64 inputs of equal shape.

    The seed is hashed before the step is added so that seeds s and s + k * golden do not walk the
    same sequence shifted by k steps. 52 random bits keep u strictly below 1 in float64.
    """
    key = _mix64(seeds + _GOLDEN)
    bits = _mix64(key + (steps + 1) * _GOLDEN)
    return (_shift_right(bits, 12).to(torch.float64) + 0.5) * (2.0**-52)
