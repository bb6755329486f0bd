"""RMSNorm, alone and fused with the residual add before it (what a pre-norm decoder layer does twice).

The torch functions are the reference and the CPU path; CUDA tensors go to the Triton kernel in
kernels/triton/rmsnorm.py (imported only then, so the CPU path never needs triton).
"""

from __future__ import annotations

import torch

from kernels.implementation import choose_implementation


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same op order as transformers' LlamaRMSNorm, so fp32 results match it bit for bit.
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        # torch's own rms_norm computes these ops in this order in one call (bitwise equal in fp32: tested
        # against LlamaRMSNorm), without six Python-dispatched ops: 61 norms are a decode step's overhead.
        return torch.rms_norm(x, (x.shape[-1],), weight, eps)
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def add_rms_norm_torch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x): the sum is the next residual stream."""
    summed = residual + x
    return rms_norm_torch(summed, weight, eps), summed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str = "auto") -> torch.Tensor:
    if choose_implementation(impl, x.device) == "torch":
        return rms_norm_torch(x, weight, eps)
    from kernels.triton.rmsnorm import rms_norm_triton

    return rms_norm_triton(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new residual) where new residual = residual + x."""
    if choose_implementation(impl, x.device) == "torch":
        return add_rms_norm_torch(x, residual, weight, eps)
    from kernels.triton.rmsnorm import rms_norm_triton

    normed, summed = rms_norm_triton(x, residual, weight, eps)
    return normed, summed
