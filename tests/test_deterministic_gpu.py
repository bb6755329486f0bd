"""Deterministic inference on CUDA (the Triton kernels: kernels/triton/invariant_*.py, the `triton_invariant`
attention backend): the checks of tests/test_deterministic.py that a GPU can falsify, by bytes, in bf16 and
fp32. All `gpu`-marked, skipped without CUDA; benchmarks/gpu_check.py runs them and reports the mode's cost
(benchmarks/deterministic_cost.py) beside the default mode's tokens/s.

The interpreter tests (tests/test_triton_invariant.py) prove the kernels' code chooses nothing from the
batch; these prove the compiled kernels, and everything else the model runs on CUDA (Triton RMSNorm and
rotary, torch's embedding, activation and log-softmax, the sampler), keep it.
"""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GREEDY = {"temperature": 0.0, "ignore_eos": True}
DTYPES = ["bfloat16", "float32"]


@pytest.fixture(scope="module")
def model_path(tiny_model_dir) -> str:
    # head_dim 64, GQA 4:1, a vocabulary of 4096: shapes that take several tiles along every axis.
    return tiny_model_dir("llama", hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                          num_key_value_heads=2, vocab_size=4096, max_position_embeddings=2048)


def make_engine(model_path: str, dtype: str, **kw: Any):
    from runtime.engine import Engine

    args = {"device": "cuda", "dtype": dtype, "max_total_tokens": 32768, "enable_deterministic_inference": True,
            **kw}
    return Engine(model_path, skip_tokenizer_init=True, progress=False, **args)


def _bits(values: list) -> bytes:
    return struct.pack(f"{len(values)}d", *[float("nan") if x is None else x for x in values])


def fingerprint(out: dict) -> tuple:
    meta = out["meta_info"]
    return (tuple(out["output_ids"]), _bits([x[0] for x in meta.get("output_token_logprobs") or []]),
            _bits([x[0] for x in meta.get("input_token_logprobs") or []]))


def prompts(seed: int, count: int, lo: int, hi: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 4096) for _ in range(rng.randrange(lo, hi))] for _ in range(count)]


TARGETS = [(prompts(100, 1, 300, 301)[0], {**GREEDY, "max_new_tokens": 32}),
           (prompts(101, 1, 5, 6)[0], {"temperature": 1.0, "sampling_seed": 1234, "max_new_tokens": 32,
                                       "ignore_eos": True})]


def mixed_load(seed: int, count: int) -> tuple[list[list[int]], list[dict]]:
    rng = random.Random(seed)
    ps = prompts(seed, count, 3, 400)
    params = [{"max_new_tokens": rng.randrange(4, 48), "ignore_eos": True,
               **({"temperature": 1.0, "sampling_seed": rng.randrange(1 << 30), "top_p": 0.9} if i % 2
                  else {"temperature": 0.0})} for i in range(count)]
    return ps, params


def targets_in(eng, load: tuple[list[list[int]], list[dict]] | None) -> list[tuple]:
    ps, params = load or ([], [])
    outs = eng.generate(input_ids=[p for p, _ in TARGETS] + ps, sampling_params=[sp for _, sp in TARGETS] + params,
                        return_logprob=True, logprob_start_len=0)
    return [fingerprint(o) for o in outs[:len(TARGETS)]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_alone_equals_in_a_batch_at_every_chunk_size_and_prefix_hit(model_path, dtype):
    eng = make_engine(model_path, dtype)
    try:
        assert type(eng.runner.backend).__name__ == "TritonInvariantAttentionBackend"
        alone = targets_in(eng, None)
        eng.flush_cache()
        assert targets_in(eng, mixed_load(1, 62)) == alone, "a request in a batch of 64 changed bits"
        # A prefix hit: the targets' prompts are cached now; output logprobs only (prompt logprobs recompute).
        again = eng.generate(input_ids=[p for p, _ in TARGETS], sampling_params=[sp for _, sp in TARGETS],
                             return_logprob=True)
        assert all(o["meta_info"]["cached_tokens"] > 0 for o in again)
        assert [fingerprint(o)[:2] for o in again] == [a[:2] for a in alone], "a prefix hit changed bits"
    finally:
        eng.shutdown()
    for chunk in (16, 64):
        eng = make_engine(model_path, dtype, chunked_prefill_size=chunk)
        try:
            assert targets_in(eng, mixed_load(2, 12)) == alone, f"chunked prefill size {chunk} changed bits"
        finally:
            eng.shutdown()


@pytest.mark.parametrize("dtype", DTYPES)
def test_prompt_logprobs_equal_decode_logprobs(model_path, dtype):
    ps = prompts(11, 4, 5, 200)
    eng = make_engine(model_path, dtype)
    try:
        decoded = eng.generate(input_ids=ps, sampling_params={"temperature": 1.0, "sampling_seed": 5,
                                                              "max_new_tokens": 40, "ignore_eos": True},
                               return_logprob=True)
        eng.flush_cache()
        for p, d in zip(ps, decoded):
            whole = eng.generate(input_ids=p + d["output_ids"], sampling_params={**GREEDY, "max_new_tokens": 1},
                                 return_logprob=True, logprob_start_len=0)
            prefilled = [x[0] for x in whole["meta_info"]["input_token_logprobs"]][len(p):]
            assert _bits(prefilled) == _bits([x[0] for x in d["meta_info"]["output_token_logprobs"]])
    finally:
        eng.shutdown()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_wise_ops_do_not_depend_on_the_row_count_on_gpu(dtype):
    """What the mode leaves to the default kernels on CUDA: Triton RMSNorm, torch's log-softmax (fp32 logits
    of a 152k vocabulary) and SiLU-and-multiply."""
    from kernels.rmsnorm import add_rms_norm, rms_norm

    g = torch.Generator(device="cuda").manual_seed(0)
    x, r = (torch.randn(300, 896, generator=g, device="cuda").to(dtype) for _ in range(2))
    weight = torch.randn(896, generator=g, device="cuda").to(dtype)
    logits = torch.randn(300, 151936, generator=g, device="cuda")
    ops = {"rms_norm": lambda i, m: rms_norm(x[i:i + m], weight, 1e-6),
           "add_rms_norm": lambda i, m: add_rms_norm(x[i:i + m], r[i:i + m], weight, 1e-6)[0],
           "log_softmax": lambda i, m: torch.log_softmax(logits[i:i + m], dim=-1),
           "silu_mul": lambda i, m: torch.nn.functional.silu(x[i:i + m]) * r[i:i + m]}
    for name, op in ops.items():
        full = op(0, 300)
        for i, m in ((0, 1), (5, 1), (7, 3), (11, 40), (100, 200)):
            assert torch.equal(op(i, m), full[i:i + m]), name


def test_default_mode_keeps_the_triton_backend_and_graphs(model_path):
    from torch import nn

    eng = make_engine(model_path, "bfloat16", enable_deterministic_inference=False)
    try:
        assert type(eng.runner.backend).__name__ == "TritonAttentionBackend"
        assert all(type(m) is nn.Linear for m in eng.runner.model.modules() if isinstance(m, nn.Linear))
    finally:
        eng.shutdown()


def test_cost_of_the_mode_is_measured(model_path, record_property):
    """The cost hook: both modes on one GRPO-shaped workload in this process (benchmarks/deterministic_cost.py);
    the ratio is recorded (and printed by benchmarks/gpu_check.py at full size), and the deterministic run
    repeats its own tokens bit for bit."""
    from benchmarks.deterministic_cost import deterministic_cost

    rows = deterministic_cost(model_path, "cuda", "bfloat16", [(8, 100, 4, 32)], {"max_total_tokens": 32768})
    by = {r["system"]: r for r in rows}
    assert set(by) == {"default", "deterministic"}
    assert by["deterministic"]["repeatable"], "the deterministic run gave other tokens the second time"
    record_property("deterministic_time_ratio", by["deterministic"]["seconds"] / by["default"]["seconds"])
