"""The CPU RMSNorm against its oracle: transformers' LlamaRMSNorm (and Qwen3's q/k norm shape), bit for bit
in fp32, for the shapes a decode step and a prefill feed it."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from kernels.rmsnorm import add_rms_norm, rms_norm


@pytest.mark.parametrize("shape", [(1, 576), (7, 576), (128, 960), (5, 12, 64), (300, 2048)])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_fp32_rms_norm_equals_transformers_bitwise(shape, eps):
    g = torch.Generator().manual_seed(shape[-1] + len(shape))
    x = torch.randn(shape, generator=g) * 3
    residual = torch.randn(shape, generator=g)
    ref = LlamaRMSNorm(shape[-1], eps=eps)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(shape[-1], generator=g))
        assert torch.equal(rms_norm(x, ref.weight, eps), ref(x))
        normed, summed = add_rms_norm(x, residual, ref.weight, eps)
        assert torch.equal(summed, residual + x)
        assert torch.equal(normed, ref(residual + x))


def test_bf16_rms_norm_keeps_transformers_order():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 576, generator=g).to(torch.bfloat16)
    ref = LlamaRMSNorm(576, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(576, generator=g))
        assert torch.equal(rms_norm(x, ref.weight, 1e-5), ref(x))
