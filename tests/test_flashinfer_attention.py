"""The FlashInfer attention backend against the torch backend, on CUDA (fp16/bf16: FlashInfer has no fp32
kernels). On CPU only its refusals run; flashinfer is imported by the GPU tests alone (it takes ~10 s)."""

from __future__ import annotations

import pytest
import torch

from triton_cases import backend_case, run_engine

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOL = {torch.float16: dict(atol=3e-3, rtol=3e-3), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _pool(dtype: torch.dtype, device: str):
    from runtime.kv_pool import KVPool

    return KVPool(1, 16, 2, 16, dtype, device)


def test_flashinfer_backend_refuses_cpu_before_importing_flashinfer():
    import sys

    from runtime.attention.registry import create_attention_backend

    had_flashinfer = "flashinfer" in sys.modules
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        create_attention_backend("flashinfer", _pool(torch.bfloat16, "cpu"))
    assert ("flashinfer" in sys.modules) == had_flashinfer


@pytest.mark.gpu
@needs_cuda
def test_flashinfer_backend_refuses_fp32():
    from runtime.attention.registry import create_attention_backend

    with pytest.raises(RuntimeError, match="float16 and bfloat16"):
        create_attention_backend("flashinfer", _pool(torch.float32, "cuda"))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page_size,window", [(1, None), (16, None), (16, 12)])
def test_flashinfer_backend_mixed_batch_matches_torch_backend(dtype, page_size, window):
    pytest.importorskip("flashinfer")
    r = backend_case(dtype, page_size, window, None, device="cuda", other="flashinfer")
    assert torch.equal(r["flashinfer_pool"], r["torch_pool"])
    assert not r["flashinfer"].isnan().any()
    torch.testing.assert_close(r["flashinfer"].float(), r["torch"].float(), **TOL[dtype])


@pytest.mark.gpu
@needs_cuda
def test_flashinfer_engine_matches_torch_backend(tiny_model_dir):
    """fp16 end to end: chunked prefill, prefix-cache hits, paging. Half precision may flip a near tie, so
    the check is: tokens agree until a request's first difference, with logprobs within 0.05 there, and
    at least 90% of requests agree entirely."""
    pytest.importorskip("flashinfer")
    model = tiny_model_dir("llama")
    prompts = [[5 + i, 17, 99, 42, 7 + i, 200, 31, 64, 128, 3] * (1 + i % 4) for i in range(10)]
    calls = [dict(input_ids=prompts, sampling_params={"temperature": 0.0, "ignore_eos": True, "max_new_tokens": 16},
                  return_logprob=True)] * 2
    args = dict(device="cuda", dtype="float16", chunked_prefill_size=16, page_size=16)
    ref = run_engine(model, {**args, "attention_backend": "torch"}, calls)
    ours = run_engine(model, {**args, "attention_backend": "flashinfer"}, calls)
    assert ours["backend"] == "FlashInferAttentionBackend" and ours["idle_clean"]
    identical = 0
    pairs = [(o, r) for outs, refs in zip(ours["outputs"], ref["outputs"]) for o, r in zip(outs, refs)]
    for o, r in pairs:
        identical += o["output_ids"] == r["output_ids"]
        for (lo, to, _), (lr, tr, _) in zip(o["meta_info"]["output_token_logprobs"],
                                            r["meta_info"]["output_token_logprobs"]):
            if to != tr:
                break
            assert lo == pytest.approx(lr, abs=0.05)
    assert identical >= 0.9 * len(pairs)
