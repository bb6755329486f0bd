"""Which implementation of a kernel runs: the torch reference or the Triton kernel.

"auto" picks Triton for CUDA tensors (when triton is installed) and torch everywhere else, so the CPU
path never imports triton. "triton" on CPU tensors is only possible under Triton's interpreter
(TRITON_INTERPRET=1, set before triton is first imported), which is how CI checks the kernels.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Literal

import torch

Implementation = Literal["auto", "torch", "triton"]
IMPLEMENTATIONS = ("auto", "torch", "triton")


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """Whether Triton runs its interpreter in this process. Triton reads TRITON_INTERPRET when it is
    imported and through its knobs, with these truthy spellings; reading the variable here keeps the
    check free of importing triton."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_triton_device(device: torch.device, error: type[Exception] = ValueError) -> None:
    """Raise `error` unless Triton kernels can run on tensors of `device` in this process."""
    if device.type != "cuda" and not triton_interpreting():
        raise error(f"Triton kernels run on CUDA tensors, or on {device.type} tensors only in Triton's "
                    f"interpreter: set TRITON_INTERPRET=1 before triton is imported.")


def choose_implementation(requested: str, device: torch.device) -> Literal["torch", "triton"]:
    if requested == "auto":
        return "triton" if device.type == "cuda" and triton_installed() else "torch"
    if requested == "torch":
        return "torch"
    if requested != "triton":
        raise ValueError(f"kernel implementation must be one of {', '.join(IMPLEMENTATIONS)}; got {requested!r}.")
    if not triton_installed():
        raise ValueError("kernel implementation 'triton' needs the triton package (pip install triton).")
    check_triton_device(device)
    return "triton"
