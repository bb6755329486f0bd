"""The MLP activation named by a config's `hidden_act`, as a plain function.

The common ones are torch functions (the same ops transformers' ACT2FN modules call, so the numbers are
the same); anything rarer comes from transformers' own table. Importing `transformers.activations`
pulls in torch.distributed.tensor and sympy, about 1.4 s of every engine start (measured), which is
why it is imported only for a name not listed here.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

Activation = Callable[[torch.Tensor], torch.Tensor]


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh approximation written out, in transformers' op order (NewGELUActivation)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS: dict[str, Activation] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_new": gelu_new,
    "relu": F.relu,
}


def activation(name: str) -> Activation:
    if name in ACTIVATIONS:
        return ACTIVATIONS[name]
    from transformers.activations import ACT2FN

    return ACT2FN[name]
