"""Drawing one token per row from probabilities truncated by top-k / top-p / min-p, by inverse CDF at a
given uniform number u (runtime/sampler.py makes u from (seed, step), so a row's token depends only on
its own probabilities, parameters, seed and step).

`draw_tokens_torch` (kernels/sampling_reference.py) is the reference and the CPU path. CUDA tensors go
to the Triton kernel in kernels/triton/sampling.py, which picks the same token as the reference for the
same probabilities and u: it reproduces the reference's arithmetic, including the fp32 block sums of its
inverse CDF in torch's CPU summation order (the only rounding there large enough to move a draw).
"""

from __future__ import annotations

import torch

from kernels.implementation import choose_implementation
from kernels.sampling_reference import CDF_BLOCK, TOP_P_PROBE, draw_tokens_torch

__all__ = ["CDF_BLOCK", "TOP_P_PROBE", "draw_tokens", "draw_tokens_torch"]


def draw_tokens(probs: torch.Tensor, u: torch.Tensor, top_k: list[int], top_p: list[float], min_p: list[float],
                impl: str = "auto") -> torch.Tensor:
    """draw_tokens_torch's contract, on the implementation chosen for probs' device."""
    if choose_implementation(impl, probs.device) == "torch":
        return draw_tokens_torch(probs, u, top_k, top_p, min_p)
    from kernels.triton.sampling import draw_tokens_triton

    return draw_tokens_triton(probs, u, top_k, top_p, min_p)
