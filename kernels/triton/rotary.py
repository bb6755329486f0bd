"""Rotary embedding by position, Triton. The reference is kernels/rotary.py.

One program per token rotates all its heads, reading the token's cos/sin rows from the tables (so any
rope scaling works: it is in the tables); q and k are one launch each. The rounding follows the
reference: cos and sin are rounded to the activations' dtype, each product is rounded, then the sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(X, Out, Positions, Cos, Sin, stride_xt, stride_xh, stride_ot, stride_oh, stride_cos,
                   stride_sin, num_heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(Positions + t).to(tl.int64)
    dt = X.dtype.element_ty
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HALF
    # Both halves of each table row are read: a table need not repeat its first half.
    c1 = tl.load(Cos + pos * stride_cos + d, mask=d_ok, other=0.0).to(dt).to(tl.float32)[None, :]
    c2 = tl.load(Cos + pos * stride_cos + HALF + d, mask=d_ok, other=0.0).to(dt).to(tl.float32)[None, :]
    s1 = tl.load(Sin + pos * stride_sin + d, mask=d_ok, other=0.0).to(dt).to(tl.float32)[None, :]
    s2 = tl.load(Sin + pos * stride_sin + HALF + d, mask=d_ok, other=0.0).to(dt).to(tl.float32)[None, :]
    heads = tl.arange(0, BLOCK_H)
    ok = (heads < num_heads)[:, None] & d_ok[None, :]
    src = X + t * stride_xt + heads[:, None] * stride_xh + d[None, :]
    x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
    # out = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)
    first = (x1 * c1).to(dt).to(tl.float32) - (x2 * s1).to(dt).to(tl.float32)
    second = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    dst = Out + t * stride_ot + heads[:, None] * stride_oh + d[None, :]
    tl.store(dst, first.to(dt), mask=ok)
    tl.store(dst + HALF, second.to(dt), mask=ok)


def _rotate(x: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
            out: torch.Tensor | None) -> torch.Tensor:
    x = x if x.stride(-1) == 1 else x.contiguous()
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or out.stride(-1) != 1:
        raise ValueError(f"out must be a {tuple(x.shape)} {x.dtype} tensor on {x.device} with a contiguous last "
                         f"dim, got {tuple(out.shape)} {out.dtype} on {out.device}.")
    t, heads, head_dim = x.shape
    if t:
        _rotary_kernel[(t,)](
            x, out, positions, cos_table, sin_table, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
            cos_table.stride(0), sin_table.stride(0), heads, HALF=head_dim // 2,
            BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(head_dim // 2),
            enable_fp_fusion=False)  # the reference rounds each product before the sum
    return out


def rotary_triton(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
                  sin_table: torch.Tensor, q_out: torch.Tensor | None = None,
                  k_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D], k: [T, Hk, D] (any token and head strides, contiguous last dim); positions: [T]
    integer; cos_table, sin_table: [P, D]. Returns rotated q and k (new tensors unless given)."""
    if q.dim() != 3 or k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2] or k.dtype != q.dtype:
        raise ValueError(f"q and k must be [T, heads, head_dim] with the same T, head_dim and dtype; got "
                         f"{tuple(q.shape)} {q.dtype} and {tuple(k.shape)} {k.dtype}.")
    t, head_dim = q.shape[0], q.shape[2]
    if head_dim % 2:
        raise ValueError(f"rotary needs an even head_dim, got {head_dim}.")
    if positions.shape != (t,):
        raise ValueError(f"positions must be [{t}], got {tuple(positions.shape)}.")
    if cos_table.shape != sin_table.shape or cos_table.dim() != 2 or cos_table.shape[1] != head_dim:
        raise ValueError(f"cos/sin tables must both be [positions, {head_dim}], got {tuple(cos_table.shape)} "
                         f"and {tuple(sin_table.shape)}.")
    cos_table = cos_table if cos_table.stride(-1) == 1 else cos_table.contiguous()
    sin_table = sin_table if sin_table.stride(-1) == 1 else sin_table.contiguous()
    return _rotate(q, positions, cos_table, sin_table, q_out), _rotate(k, positions, cos_table, sin_table, k_out)
