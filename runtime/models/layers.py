"""Building blocks shared by the decoder families: norm, rotary table, fused projections."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from kernels.rmsnorm import add_rms_norm, rms_norm
from kernels.rotary import RotaryInputs, prepare_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x) in one kernel on a GPU."""
        return add_rms_norm(x, residual, self.weight, self.eps)


def rope_parameters(config: PretrainedConfig) -> dict:
    params = getattr(config, "rope_parameters", None)
    if params is None:  # transformers < 5 keeps them as rope_theta + rope_scaling
        params = {"rope_theta": getattr(config, "rope_theta", 10000.0), "rope_type": "default"}
        scaling = getattr(config, "rope_scaling", None) or {}
        params.update(scaling)
        params["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    return params


class RotaryTable(nn.Module):
    """cos/sin for every position up to max_positions, computed once like transformers does per step."""

    def __init__(self, config: PretrainedConfig, head_dim: int, max_positions: int):
        super().__init__()
        params = rope_parameters(config)
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            base = params["rope_theta"]
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            scaling = 1.0
        elif rope_type == "dynamic":
            raise ValueError("rope_type 'dynamic' depends on the sequence length at run time; not supported.")
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
        positions = torch.arange(max_positions, dtype=torch.float)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> RotaryInputs:
        return prepare_rotary(positions, self.cos, self.sin, dtype)
