"""Where a Triton kernel runs: compiled on a CUDA device, or in Triton's interpreter.

Whether Triton interprets is decided once per process, when it is imported (TRITON_INTERPRET=1); the
one check of it is kernels/implementation.py's `triton_interpreting` (it reads the variable without
importing triton, so the CPU path's dispatch never imports it). CPU tensors can only run in the
interpreter, which is how every kernel is tested on machines without a GPU.
"""

from __future__ import annotations

import torch

from kernels.implementation import check_triton_device, triton_interpreting


def check_launchable(device: torch.device) -> None:
    check_triton_device(device, RuntimeError)


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether a kernel should upcast its tl.dot operands to fp32 (and ask for IEEE precision).

    fp32 inputs: a GPU would otherwise round them to TF32. bf16 in the interpreter: its tl.dot returns
    garbage for bf16 (measured with Triton 3.6-3.9). fp16 and bf16 on a GPU use the tensor cores with
    fp32 accumulation (fp16 is exact in the interpreter, so that path is tested there)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and triton_interpreting())
