"""The batch-invariant Triton kernels of `--enable-deterministic-inference` (kernels/triton/invariant_*.py):
close to their torch references, and bitwise invariant to the batch.

Checked for every kernel, by bytes: a matmul row computed alone (M = 1) equals the same row in an M = 37
call and at another place in its tile; an attention query's output is the same prefilled whole beside other
requests, prefilled in chunks, decoded in a batch of decodes and chunks, and decoded alone.

What the interpreter run (TRITON_INTERPRET=1, CPU) proves and what it does not: it runs these kernels' own
code (tiling, masks, loop bounds, block order, the online-softmax recurrence), so it proves that nothing in
them chooses the reduction from the batch: each output element is computed by the same sequence of tile
operations whichever call it is in. It does not prove the GPU's bits: there tl.dot runs in numpy (BLAS, fp32
operands, bf16 upcast), not on tensor cores, and the compiler's code (MMA layouts, fused FMAs, the order
of tl.sum's tree) is not exercised. Measured by mutation: a BLOCK_K chosen from M fails the fp32 matmul
case here, but a BLOCK_M chosen from M passes (numpy computes each row alike whatever the tile height), as
would anything else that only changes the GPU's instruction mix. That a compiled tile computes a row the
same wherever the row sits, whatever the call's shape, is what the `gpu` tests below check on CUDA, with
the model end to end in tests/test_deterministic_gpu.py.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import random
import struct

import pytest
import torch

from invariant_cases import attention_case, engine_case, matmul_case, rmsnorm_case

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_VERSION = tuple(int(x) for x in importlib.metadata.version("triton").split(".")[:2]) if HAS_TRITON else ()
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install -e '.[dev]')")
needs_interpreter = pytest.mark.skipif(
    TRITON_VERSION < (3, 7), reason="Triton < 3.7's interpreter fails with numpy 2 on range() over a loaded value")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Against an fp32 reference. bf16: the interpreter rounds its fp32 sums to bf16 by truncation (1 ulp).
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3),
       torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


@pytest.fixture(scope="module")
def interpreter(triton_interpreter):
    return triton_interpreter.run


def _check_matmul(r: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    assert not r["full"].isnan().any()
    torch.testing.assert_close(r["full"].float(), r["ref"], **TOL[dtype])
    assert torch.equal(r["alone"], r["full"][r["probes"]]), "a row alone differs from the row in M = 37"
    assert torch.equal(r["shifted"], r["full"][1:-2]), "rows moved within their tiles changed bits"


def _check_attention(r: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    assert not r["batched"].isnan().any(), "a row of the output was never written"
    torch.testing.assert_close(r["batched"].float(), r["ref"], **TOL[dtype])
    assert torch.equal(r["chunked"], r["batched"]), "chunked prefill differs from the whole prefill"
    assert torch.equal(r["decoded_batch"], r["batched"][r["probes"]]), "decode differs from prefill"
    assert torch.equal(r["decoded_alone"], r["decoded_batch"]), "a decode alone differs from it in a batch"


MATMUL_CASES = [   # dtype, M, K, N, bias: K and N not multiples of the tiles, M across two row tiles
    (torch.float32, 37, 48, 80, True),
    (torch.bfloat16, 37, 80, 136, True),
    (torch.float16, 37, 64, 72, False),
]


@needs_interpreter
@pytest.mark.parametrize("dtype,m,k,n,bias", MATMUL_CASES)
def test_matmul_rows_are_batch_invariant(interpreter, dtype, m, k, n, bias):
    _check_matmul(interpreter(matmul_case, dtype, m, k, n, bias), dtype)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_rows_are_batch_invariant(interpreter, dtype):
    r = interpreter(rmsnorm_case, dtype)
    assert torch.equal(r["alone"], r["full"][r["probes"]])


ATTENTION_CASES = [   # dtype, page_size, sliding_window, group, head_dim
    (torch.float32, 1, None, 3, 16),
    (torch.float32, 16, 24, 2, 24),
    (torch.float16, 16, None, 4, 16),
    (torch.bfloat16, 1, 20, 1, 16),
]


@needs_interpreter
@pytest.mark.parametrize("dtype,page_size,window,group,head_dim", ATTENTION_CASES)
def test_attention_is_the_same_prefilled_chunked_or_decoded(interpreter, dtype, page_size, window, group, head_dim):
    _check_attention(interpreter(attention_case, dtype, page_size, window, group, head_dim), dtype)


# --- compiled for an H100/H200 (sm_90), on CPU -----------------------------------------------------

SM90_SHARED_MEMORY = 232448
INDEX_POINTERS = {"PageTable": "*i64", "PrefixLens": "*i64", "ExtendLens": "*i64", "QStarts": "*i64"}


def _compile_cases():
    from kernels.triton import invariant_attention as attention
    from kernels.triton import invariant_matmul as matmul

    cases = []
    for dtype, t in ((torch.bfloat16, "*bf16"), (torch.float32, "*fp32")):
        bm, bn, bk = matmul.TILES[dtype]
        cases.append((matmul._matmul, t, dict(HAS_BIAS=True, DOT_FP32=dtype == torch.float32, BLOCK_M=bm,
                                               BLOCK_N=bn, BLOCK_K=bk), matmul.NUM_STAGES))
        cases.append((attention._invariant_attention, t, dict(
            GROUP=7, HEAD_DIM=64, HAS_WINDOW=dtype == torch.float32, DOT_FP32=dtype == torch.float32,
            BLOCK_M=attention.BLOCK_M, BLOCK_N=attention.block_n(dtype), BLOCK_D=64), 3))
    return cases


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernels_compile_for_sm90():
    """The GPU compiler's checks (tl.dot shapes, types, shared memory at the tiles the launchers fix) on any
    machine: Triton compiles to a cubin for sm_90 with the ptxas it ships."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if triton.knobs.runtime.interpret:
        pytest.skip("this process runs Triton's interpreter (TRITON_INTERPRET=1): nothing to compile")
    for fn, data_type, constexprs, stages in _compile_cases():
        signature = {}
        for arg in fn.arg_names:
            if arg in constexprs:
                signature[arg] = "constexpr"
            elif arg[0].isupper():       # pointers are capitalised
                signature[arg] = INDEX_POINTERS.get(arg, data_type)
            else:
                signature[arg] = "fp32" if arg.startswith("scale") else "i32"
        compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": 4, "num_stages": stages})
        assert compiled.asm["cubin"]
        assert compiled.metadata.shared <= SM90_SHARED_MEMORY, (fn.__name__, data_type, compiled.metadata.shared)


# --- compiled, on CUDA ----------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_rows_are_batch_invariant_on_gpu(dtype):
    # SmolLM2's MLP shapes, and a row count past several tiles.
    _check_matmul(matmul_case(dtype, 300, 576, 1536, True, device="cuda"), dtype)
    _check_matmul(matmul_case(dtype, 37, 1536, 576, False, device="cuda"), dtype)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype,page_size,window,group", [(torch.float32, 16, None, 3), (torch.bfloat16, 16, None, 3),
                                                          (torch.bfloat16, 1, 20, 1)])
def test_attention_is_the_same_prefilled_chunked_or_decoded_on_gpu(dtype, page_size, window, group):
    for head_dim in (64, 128):
        _check_attention(attention_case(dtype, page_size, window, group, head_dim, device="cuda"), dtype)


# --- the engine, interpreted ----------------------------------------------------------------------


def _bits(entries: list) -> bytes:
    """A logprob list's values as their float64 bytes (None: a marker), to compare bits, not values."""
    return b"".join(b"N" if lp is None else struct.pack("<d", lp) for lp, _, _ in entries)


def _check_engine(result: dict, prompt_len: int) -> None:
    fingerprints = set()
    for chunk, r in result.items():
        assert r["backend"] == "TritonInvariantAttentionBackend" and r["linears"] == ["TritonInvariantLinear"]
        alone, in_batch, scored = r["alone"], r["batch"][1], r["scored"]
        out = alone["meta_info"]["output_token_logprobs"]
        assert in_batch["output_ids"] == alone["output_ids"], f"chunk {chunk}: tokens differ in a batch"
        assert _bits(in_batch["meta_info"]["output_token_logprobs"]) == _bits(out), f"chunk {chunk}: batch"
        # The completion's tokens scored in one prefill: the logprobs they got while decoded, bit for bit.
        prompt_lps = scored["meta_info"]["input_token_logprobs"][prompt_len:]
        assert [t for _, t, _ in prompt_lps] == alone["output_ids"]
        assert _bits(prompt_lps) == _bits(out), f"chunk {chunk}: prefill logprobs differ from decode logprobs"
        fingerprints.add((tuple(alone["output_ids"]), _bits(out)))
    assert len(fingerprints) == 1, "the chunked-prefill size changed the bits"


@needs_interpreter
def test_engine_is_batch_invariant_on_the_triton_backend(interpreter, tiny_model_dir):
    """Deterministic mode with --attention-backend triton, interpreted, prefill chunks of 8 tokens: a request
    alone and among two others (its prompt then chunked at other places, beside other chunks and decodes)
    gets the same tokens and logprob bits, and its completion's prompt logprobs (prefilled) are the bits it
    was decoded with. (Chunk sizes and prefix hits at the kernel level: the attention tests above.)"""
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 256) for _ in range(n)] for n in (9, 2, 6)]
    result = interpreter(engine_case, tiny_model_dir("llama"), prompts, 3, (8,))
    _check_engine(result, len(prompts[0]))
