"""Rotary position embedding (the rotate-half form Llama, Qwen and Mistral use), applied to q and k.

The cos/sin tables ([max_positions, head_dim], one row per position) carry the rope scaling (default,
linear, llama3, ...: runtime/models/layers.py builds them); the kernels only gather rows by position.
`prepare_rotary` runs once per forward pass and `apply_rotary` once per layer. The torch functions
are the reference and the CPU path (they keep transformers' op order, so fp32 matches it bit for bit);
CUDA tensors go to the Triton kernel in kernels/triton/rotary.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.implementation import choose_implementation


def apply_rotary_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos, sin: [T, head_dim] (already gathered by position)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def rotary_torch(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
                 sin_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference of the whole operation: gather the tables by position, rotate q and k."""
    cos, sin = cos_table[positions].to(q.dtype), sin_table[positions].to(q.dtype)
    return apply_rotary_torch(q, cos, sin), apply_rotary_torch(k, cos, sin)


@dataclass(frozen=True)
class RotaryInputs:
    """What every layer of one forward pass needs: the positions and full tables (Triton gathers per
    token itself), or the rows already gathered in the model dtype (torch, gathered once per pass)."""

    implementation: str
    positions: torch.Tensor
    cos_table: torch.Tensor
    sin_table: torch.Tensor
    cos: torch.Tensor | None
    sin: torch.Tensor | None


def prepare_rotary(positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
                   dtype: torch.dtype, impl: str = "auto") -> RotaryInputs:
    chosen = choose_implementation(impl, positions.device)
    if chosen == "torch":
        return RotaryInputs(chosen, positions, cos_table, sin_table,
                            cos_table[positions].to(dtype), sin_table[positions].to(dtype))
    return RotaryInputs(chosen, positions, cos_table, sin_table, None, None)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, rope: RotaryInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, heads, head_dim], k: [T, kv_heads, head_dim] -> both rotated (new tensors)."""
    if rope.implementation == "torch":
        # q and k side by side in one call: the same elementwise ops on the same values (bit for bit), at
        # half the op count, which is what a decode step of a small model pays for.
        heads = q.shape[1]
        qk = apply_rotary_torch(torch.cat((q, k), dim=1), rope.cos, rope.sin)
        return qk[:, :heads], qk[:, heads:]
    from kernels.triton.rotary import rotary_triton

    return rotary_triton(q, k, rope.positions, rope.cos_table, rope.sin_table)
