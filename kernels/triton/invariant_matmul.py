"""Batch-invariant matmul, x @ W^T (+ bias), Triton: every output row is bitwise the same whatever the row
count M is and wherever the row sits. The reference is torch.nn.functional.linear.

What makes a GEMM's rows depend on M is the library choosing its kernel, tiles or split-K from the shape.
Here nothing is chosen from M: the tiles (TILES, by dtype only), warps and stages are constants, there is no
split-K, and each program reduces over K in one loop, BLOCK_K at a time from k = 0 upwards, into one fp32
accumulator. An output element is so the same sequence of tile products whatever M is; rows past M are
masked loads of zeros, which touch no other row's sums. K and N are the weight's, the same in every call.

The same kernel serves every linear layer and the LM head of `--enable-deterministic-inference` on the
Triton backend (runtime/deterministic.py). fp32 operands use IEEE dots (no TF32), as kernels/triton/device.py
says for every kernel here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.device import check_launchable, dot_in_fp32

# (BLOCK_M, BLOCK_N, BLOCK_K) per operand dtype; never a function of M. fp32 tiles are narrower so three
# pipeline stages fit an H100's shared memory.
TILES = {torch.float32: (64, 64, 64), torch.float16: (64, 128, 64), torch.bfloat16: (64, 128, 64)}
NUM_WARPS = 4
NUM_STAGES = 3


# The row count varies per call: not specialised on (Triton compiles M = 1 and M % 16 == 0 apart otherwise),
# so every M runs one compiled kernel.
@triton.jit(do_not_specialize=["num_rows"])
def _matmul(X, W, B, Out, num_rows, num_cols, depth, stride_xm, stride_wn, stride_om,
            HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_rows
    col_ok = cols < num_cols
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, depth, BLOCK_K):
        k_ok = (k0 + kk) < depth
        x = tl.load(X + rows[:, None] * stride_xm + (k0 + kk)[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(W + cols[None, :] * stride_wn + (k0 + kk)[:, None], mask=col_ok[None, :] & k_ok[:, None],
                    other=0.0)
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    if HAS_BIAS:
        acc = acc + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Out + rows[:, None] * stride_om + cols[None, :], acc.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def invariant_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) with rows independent of each other and of their count (any leading dims).

    x [..., K] and weight [N, K] of one dtype (fp32, fp16 or bf16); the output has x's dtype, the sum is fp32
    and the bias is added to it before the one rounding."""
    if x.dtype != weight.dtype or x.dtype not in TILES:
        raise ValueError(f"invariant_matmul needs x and weight of one dtype among {list(TILES)}; got {x.dtype} "
                         f"and {weight.dtype}.")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {k}.")
    lead = x.shape[:-1]
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    m = rows.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        check_launchable(x.device)
        block_m, block_n, block_k = TILES[x.dtype]
        _matmul[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
            rows, weight, bias if bias is not None else weight, out, m, n, k,
            rows.stride(0), weight.stride(0), out.stride(0),
            HAS_BIAS=bias is not None, DOT_FP32=dot_in_fp32(x.dtype),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out.reshape(*lead, n)
