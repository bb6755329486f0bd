"""`--enable-deterministic-inference`: turn a loaded model into its batch-invariant form.

The serving model's linear layers (projections, MLP, LM head) get a forward whose rows never depend on the
other rows of the step, and attention runs on a batch-invariant backend instead of the configured one. Two
sets of kernels keep that promise:

- the CPU torch path (kernels/batch_invariant.py): InvariantLinear and the `batch_invariant` backend;
- the Triton path, on CUDA (and on CPU tensors in Triton's interpreter, with `--attention-backend triton`,
  which is how it is tested without a GPU): TritonInvariantLinear (kernels/triton/invariant_matmul.py) and
  the `triton_invariant` backend (kernels/triton/invariant_attention.py).

Norms, rotary, activations, residual adds and the sampler's log-softmax work row by row on both paths
(RMSNorm: torch on CPU, kernels/triton/rmsnorm.py's one program per row on CUDA, its block set by the row
width only; log-softmax: torch's, one block per row sized by the vocabulary; tests/test_deterministic.py and
tests/test_deterministic_gpu.py check them). Parameter names and storage are unchanged, so weight updates
and checksums work as in the default mode.

Supported: the dense decoder families. Anything else is refused with the reason, rather than served with a
guarantee it does not keep: mixture-of-experts layers (their expert matmuls group tokens by expert, so a
token's rows depend on the batch) and devices other than CPU and CUDA.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.batch_invariant import invariant_linear
from kernels.implementation import check_triton_device, triton_installed
from runtime.models.layers import RMSNorm

# The attention backends of the mode (runtime/attention/registry.py).
BATCH_INVARIANT_BACKEND = "batch_invariant"
TRITON_INVARIANT_BACKEND = "triton_invariant"


class InvariantLinear(nn.Linear):
    """nn.Linear whose output rows are bitwise independent of the batch (same parameters, same names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return invariant_linear(x, self.weight, self.bias)


class TritonInvariantLinear(nn.Linear):
    """InvariantLinear on the Triton kernel: fixed tiles, no split-K, one K order for every row count."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Imported here: the CPU path (and this module) must work without triton installed.
        from kernels.triton.invariant_matmul import invariant_matmul

        return invariant_matmul(x, self.weight, self.bias)


def uses_triton(device: torch.device, attention_backend: str | None) -> bool:
    """The Triton kernels serve the mode on CUDA, and on CPU when the Triton backend was asked for."""
    return device.type == "cuda" or attention_backend == "triton"


def check_supported(device: torch.device, model: nn.Module | None = None, attention_backend: str | None = None) -> None:
    """Raise ValueError naming what deterministic inference does not cover."""
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"enable_deterministic_inference runs on CPU (torch kernels) or CUDA (Triton kernels); "
                         f"not on device {device}.")
    if uses_triton(device, attention_backend):
        if not triton_installed():
            raise ValueError(f"enable_deterministic_inference on {device.type} uses the Triton kernels; the "
                             f"triton package is not installed.")
        check_triton_device(device)
    if model is None:
        return
    unsupported = sorted({type(m).__name__ for m in model.modules()
                          if not isinstance(m, (nn.Linear, nn.Embedding, RMSNorm))
                          and any(True for _ in m.parameters(recurse=False))})
    if unsupported:
        raise ValueError(f"enable_deterministic_inference supports dense decoders (linear, embedding and "
                         f"RMSNorm parameters); this model also has {', '.join(unsupported)} "
                         f"(mixture-of-experts layers are not batch-invariant).")


def make_batch_invariant(model: nn.Module, device: torch.device, attention_backend: str | None = None) -> str:
    """Swap every nn.Linear of `model` for its invariant form in place; returns the attention backend to use
    (the Triton one on CUDA or when `attention_backend` is "triton", else the CPU torch one)."""
    check_supported(device, model, attention_backend)
    triton = uses_triton(device, attention_backend)
    linear_cls = TritonInvariantLinear if triton else InvariantLinear
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = linear_cls
    return TRITON_INVARIANT_BACKEND if triton else BATCH_INVARIANT_BACKEND
