"""RMSNorm with an optional fused residual add, Triton. The reference is kernels/rmsnorm.py.

One program per row, the whole row in one block. The rounding follows the reference: the residual
sum is rounded to the input dtype (it is the next residual stream), the statistics are fp32, the
normalised row is rounded to the input dtype before the weight multiplies it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_COLS = 65536


@triton.jit
def _rms_norm_kernel(X, R, W, Out, SumOut, stride_x, stride_r, stride_o, stride_s, n_cols, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(SumOut + row * stride_s + cols, x, mask=ok)
    h = x.to(tl.float32)
    variance = tl.sum(h * h, axis=0) / n_cols
    h = (h * tl.rsqrt(variance + eps)).to(X.dtype.element_ty)
    w = tl.load(W + cols, mask=ok, other=0.0)
    tl.store(Out + row * stride_o + cols, (w.to(tl.float32) * h.to(tl.float32)).to(Out.dtype.element_ty),
             mask=ok)


def _rows(x: torch.Tensor, n_cols: int) -> torch.Tensor:
    rows = x.reshape(-1, n_cols)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _output(given: torch.Tensor | None, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if given is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if given.shape != shape or given.dtype != dtype or given.device != device or not given.is_contiguous():
        raise ValueError(f"an output must be a contiguous {tuple(shape)} {dtype} tensor on {device}, got "
                         f"{tuple(given.shape)} {given.dtype} on {given.device}.")
    return given


def rms_norm_triton(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                    out: torch.Tensor | None = None,
                    summed_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rms_norm(residual + x), residual + x), or (rms_norm(x), None) without a residual.

    x, residual: [..., n]. The outputs are contiguous tensors of x's shape, new ones unless given; the
    normed one has the dtype torch would give weight * x (the reference's last op)."""
    n_cols = x.shape[-1]
    if n_cols > _MAX_COLS:
        raise ValueError(f"rms_norm_triton handles rows of at most {_MAX_COLS} values, got {n_cols}.")
    if weight.shape != (n_cols,):
        raise ValueError(f"weight must be [{n_cols}], got {tuple(weight.shape)}.")
    xr = _rows(x, n_cols)
    out = _output(out, x.shape, torch.promote_types(weight.dtype, x.dtype), x.device)
    out_rows = out.view(-1, n_cols)
    summed = None
    rr, sum_rows = xr, out_rows  # placeholders the kernel never touches without a residual
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual must match x ({tuple(x.shape)}, {x.dtype}), got "
                             f"({tuple(residual.shape)}, {residual.dtype}).")
        rr = _rows(residual, n_cols)
        summed = _output(summed_out, x.shape, x.dtype, x.device)
        sum_rows = summed.view(-1, n_cols)
    n_rows = xr.shape[0]
    if n_rows:
        _rms_norm_kernel[(n_rows,)](
            xr, rr, weight, out_rows, sum_rows, xr.stride(0), rr.stride(0), out_rows.stride(0),
            sum_rows.stride(0), n_cols, float(eps),
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n_cols))
    return out, summed
