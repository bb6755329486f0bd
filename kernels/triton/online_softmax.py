"""One step of online softmax (flash attention's inner loop), shared by the attention kernels, and their
block size."""

import torch
import triton
import triton.language as tl


def key_block_size(block_d: int, dtype: torch.dtype) -> int:
    """Keys per block (and query rows per block of extend): smaller for wide heads and for fp32, so the
    tiles fit a GPU's shared memory."""
    return 32 if block_d > 128 or dtype == torch.float32 else 64


@triton.jit
def attend_block(q, k, v, visible, scale_log2, m, l, acc, DOT_FP32: tl.constexpr):
    """Fold a block of keys into running (row max m, row sum l, unnormalised output acc), in base 2.

    q [R, D] (already fp32 when DOT_FP32), k/v [N, D], visible [R, N]. A row that has seen no visible
    key keeps m = -inf, l = 0, acc = 0."""
    if DOT_FP32:
        qk = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    qk = tl.where(visible, qk * scale_log2, float("-inf"))
    m_new = tl.maximum(m, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(qk - m_safe[:, None])
    alpha = tl.exp2(m - m_safe)
    l = l * alpha + tl.sum(p, 1)
    if DOT_FP32:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l, acc
