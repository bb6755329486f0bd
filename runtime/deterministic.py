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

Supported: the dense decoder families, and on the CPU torch path the mixture-of-experts ones too (the router
and the experts' grouped products on invariant_linear: an expert's row has the same bits however many rows
were routed to it, and a token's expert outputs are added in ascending expert order). Anything else is
refused with the reason, rather than served with a guarantee it does not keep: MoE layers on the Triton path
and devices other than CPU and CUDA. The trainer-side forward (runtime/trainer_forward.py) is dense only.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.batch_invariant import invariant_linear
from kernels.implementation import check_triton_device, triton_installed
from runtime.models.layers import RMSNorm
from runtime.models.moe import StackedExperts, TopKRouter

# The attention backends of the mode (runtime/attention/registry.py).
BATCH_INVARIANT_BACKEND = "batch_invariant"
TRITON_INVARIANT_BACKEND = "triton_invariant"


class InvariantLinear(nn.Linear):
    """nn.Linear whose output rows are bitwise independent of the batch (same parameters, same names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return invariant_linear(x, self.weight, self.bias)


class InvariantTopKRouter(TopKRouter):
    """The MoE router on invariant_linear: a token's routing never depends on the rest of the batch."""

    linear = staticmethod(invariant_linear)


class InvariantStackedExperts(StackedExperts):
    """Experts on invariant_linear. Each expert multiplies the rows routed to it in one call: however many
    there are, each row's product has the same bits, and a token's expert outputs are summed in ascending
    expert order whatever else is in the batch."""

    linear = staticmethod(invariant_linear)


class TritonInvariantLinear(nn.Linear):
    """InvariantLinear on the Triton kernel: fixed tiles, no split-K, one K order for every row count."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Imported here: the CPU path (and this module) must work without triton installed.
        from kernels.triton.invariant_matmul import invariant_matmul

        return invariant_matmul(x, self.weight, self.bias)


def uses_triton(device: torch.device, attention_backend: str | None) -> bool:
    """The Triton kernels serve the mode on CUDA, and on CPU when the Triton backend was asked for."""
    return device.type == "cuda" or attention_backend == "triton"


def invariant_forms(triton: bool) -> dict[type, type]:
    """Each layer type the mode rewrites -> its invariant form on this path. MoE layers have one on the CPU
    torch path only: the Triton matmul is not wired into the experts' grouped products."""
    if triton:
        return {nn.Linear: TritonInvariantLinear}
    return {nn.Linear: InvariantLinear, TopKRouter: InvariantTopKRouter, StackedExperts: InvariantStackedExperts}


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
    known = (nn.Embedding, RMSNorm, *invariant_forms(uses_triton(device, attention_backend)))
    unsupported = sorted({type(m).__name__ for m in model.modules()
                          if not isinstance(m, known) and any(True for _ in m.parameters(recurse=False))})
    if unsupported:
        raise ValueError(f"enable_deterministic_inference supports dense decoders (linear, embedding and "
                         f"RMSNorm parameters), and mixture-of-experts layers on the CPU torch path; this model "
                         f"also has {', '.join(unsupported)} here.")


def make_batch_invariant(model: nn.Module, device: torch.device, attention_backend: str | None = None) -> str:
    """Swap every layer of `model` for its invariant form in place (invariant_forms); returns the attention
    backend to use (the Triton one on CUDA or when `attention_backend` is "triton", else the CPU torch one)."""
    check_supported(device, model, attention_backend)
    triton = uses_triton(device, attention_backend)
    forms = invariant_forms(triton)
    for module in model.modules():
        form = forms.get(type(module))
        if form is not None:
            module.__class__ = form
    return TRITON_INVARIANT_BACKEND if triton else BATCH_INVARIANT_BACKEND
