"""ServerArgs' device and dtype defaults: fp32 on CPU, bf16 on CUDA, fp32 whenever asked for."""

import pytest
import torch

from runtime.server_args import ServerArgs


@pytest.mark.parametrize("device, dtype, want", [
    ("cpu", "auto", torch.float32), ("cpu:0", "auto", torch.float32), ("cuda", "auto", torch.bfloat16),
    ("cuda", "float32", torch.float32), ("cuda", "fp32", torch.float32), ("cpu", "bfloat16", torch.bfloat16),
    ("cuda:1", "float16", torch.float16),
])
def test_dtype_follows_the_device_unless_given(device, dtype, want) -> None:
    assert ServerArgs(device=device, dtype=dtype).torch_dtype == want


def test_device_defaults_to_cuda_when_present() -> None:
    assert ServerArgs().device == ("cuda" if torch.cuda.is_available() else "cpu")


def test_unknown_dtype_is_refused_with_its_name() -> None:
    with pytest.raises(ValueError, match="'float8'"):
        ServerArgs(device="cpu", dtype="float8").torch_dtype
