"""Where a Triton kernel runs: compiled on a CUDA device, or in Triton's interpreter.

Triton decides between the two once per process, when it is imported (TRITON_INTERPRET=1 selects the
interpreter; its standard library is built for one mode at import). CPU tensors can only run in the
interpreter, which is how every kernel is tested on machines without a GPU.
"""

from __future__ import annotations

import torch
import triton


def interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


def check_launchable(device: torch.device) -> None:
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(f"Triton kernels run on CUDA tensors, or on {device.type} tensors only in Triton's "
                           f"interpreter: set TRITON_INTERPRET=1 before triton is imported.")


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether a kernel should upcast its tl.dot operands to fp32 (and ask for IEEE precision).

    fp32 inputs: a GPU would otherwise round them to TF32. bf16 in the interpreter: its tl.dot returns
    garbage for bf16 (measured with Triton 3.6-3.9). fp16 and bf16 on a GPU use the tensor cores with
    fp32 accumulation (fp16 is exact in the interpreter, so that path is tested there)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())
