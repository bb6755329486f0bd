"""`--enable-deterministic-inference`: turn a loaded model into its batch-invariant form.

The serving model's linear layers (projections, MLP, LM head) become InvariantLinear, whose rows never
depend on the other rows of the step (kernels/batch_invariant.py), and attention runs on the
batch-invariant backend instead of the configured one. Norms, rotary, activations, residual adds and the
sampler's log-softmax already work row by row on this CPU build (tests/test_deterministic.py checks each).
Parameter names and storage are unchanged, so weight updates and checksums work as in the default mode.

Supported: the dense decoder families on the CPU torch path. Anything else is refused with the reason,
rather than served with a guarantee it does not keep: mixture-of-experts layers (their expert matmuls
group tokens by expert, so a token's rows depend on the batch) and CUDA (the Triton kernels are not
batch-invariant yet).
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.batch_invariant import invariant_linear
from runtime.models.layers import RMSNorm

# The attention backend of the mode (runtime/attention/registry.py).
BATCH_INVARIANT_BACKEND = "batch_invariant"


class InvariantLinear(nn.Linear):
    """nn.Linear whose output rows are bitwise independent of the batch (same parameters, same names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return invariant_linear(x, self.weight, self.bias)


def check_supported(device: torch.device, model: nn.Module | None = None) -> None:
    """Raise ValueError naming what deterministic inference does not cover."""
    if device.type != "cpu":
        raise ValueError(f"enable_deterministic_inference is implemented on the CPU torch path only; device "
                         f"{device} would use the Triton kernels, which are not batch-invariant yet.")
    if model is None:
        return
    unsupported = sorted({type(m).__name__ for m in model.modules()
                          if not isinstance(m, (nn.Linear, nn.Embedding, RMSNorm))
                          and any(True for _ in m.parameters(recurse=False))})
    if unsupported:
        raise ValueError(f"enable_deterministic_inference supports dense decoders (linear, embedding and "
                         f"RMSNorm parameters); this model also has {', '.join(unsupported)} "
                         f"(mixture-of-experts layers are not batch-invariant).")


def make_batch_invariant(model: nn.Module, device: torch.device) -> str:
    """Swap every nn.Linear of `model` for InvariantLinear in place; returns the attention backend to use."""
    check_supported(device, model)
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = InvariantLinear
    return BATCH_INVARIANT_BACKEND
