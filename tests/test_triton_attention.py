"""The Triton attention kernels and backend against their torch references, on every CPU.

On CPU the kernels run in Triton's interpreter, in one child process (tests/triton_interpret.py says why);
fp32 results must match the reference to float noise, fp16/bf16 to their rounding. The engine runs end to
end with --attention-backend triton (interpreted) against the torch backend: chunked prefill, prefix-cache
hits, paging and retraction give the same greedy tokens and logprobs within 1e-5.

Also on CPU: every kernel compiles for an H100/H200 (sm_90) with the Triton installed here, and the torch
backend builds no tensor off the batch's device. On a CUDA machine the `gpu` tests run the same cases
compiled, and the engine with the triton backend against the torch backend.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import triton_cases
from triton_cases import backend_case, decode_case, extend_case, run_engine, store_case

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_VERSION = tuple(int(x) for x in importlib.metadata.version("triton").split(".")[:2]) if HAS_TRITON else ()
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install -e '.[dev]')")
needs_interpreter = pytest.mark.skipif(
    TRITON_VERSION < (3, 7), reason="Triton < 3.7's interpreter fails with numpy 2 on range() over a loaded value")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def gpu_test(fn):
    return pytest.mark.gpu(needs_cuda(fn))

# Tolerances against an fp32 reference: fp16/bf16 outputs carry their own rounding (p is rounded to the
# input type before the P @ V product on a GPU, as in every flash kernel).
TOL = {torch.float32: dict(atol=2e-6, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.fixture(scope="module")
def interpreter(triton_interpreter):
    """The session's interpreting child process (tests/triton_interpret.py), as a call."""
    return triton_interpreter.run


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not out.isnan().any(), "a row of the output was never written"
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


# --- kernels in the interpreter -------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_store_kv(interpreter, dtype, page_size):
    ours, ref = interpreter(store_case, dtype, page_size)
    assert torch.equal(ours, ref)


DECODE_CASES = [
    # dtype, page_size, num_splits, sliding_window, group
    (torch.float32, 1, 1, None, 3),
    (torch.float32, 16, 4, None, 3),
    (torch.float32, 16, 3, 20, 1),
    (torch.float32, 1, 2, 40, 8),
    (torch.float16, 16, 1, None, 2),
    (torch.float16, 1, 4, 20, 3),
    (torch.bfloat16, 16, 2, None, 4),
]


@needs_interpreter
@pytest.mark.parametrize("dtype,page_size,num_splits,window,group", DECODE_CASES)
def test_decode_attention(interpreter, dtype, page_size, num_splits, window, group):
    out, ref = interpreter(decode_case, dtype, page_size, num_splits, window, group)
    _close(out, ref, dtype)


@needs_interpreter
def test_decode_attention_head_dim_not_a_power_of_two(interpreter):
    out, ref = interpreter(decode_case, torch.float32, 16, 2, None, 2, head_dim=24)
    _close(out, ref, torch.float32)


EXTEND_CASES = [
    # dtype, page_size, sliding_window, group
    (torch.float32, 1, None, 3),
    (torch.float32, 16, None, 1),
    (torch.float32, 16, 24, 2),
    (torch.float16, 1, 24, 3),
    (torch.float16, 16, None, 2),
    (torch.bfloat16, 1, None, 2),
]


@needs_interpreter
@pytest.mark.parametrize("dtype,page_size,window,group", EXTEND_CASES)
def test_extend_attention(interpreter, dtype, page_size, window, group):
    out, ref = interpreter(extend_case, dtype, page_size, window, group)
    _close(out, ref, dtype)


@needs_interpreter
@pytest.mark.parametrize("dtype,page_size,window,splits", [(torch.float32, 1, None, None),
                                                            (torch.float32, 16, 12, 3),
                                                            (torch.float16, 16, None, 2)])
def test_backend_mixed_batch_matches_torch_backend(interpreter, dtype, page_size, window, splits):
    r = interpreter(backend_case, dtype, page_size, window, splits)
    assert torch.equal(r["triton_pool"], r["torch_pool"])
    _close(r["triton"], r["torch"], dtype)


# --- the engine, interpreted ----------------------------------------------------------------------


LOGPROB_TOL = 1e-5


def _prompts(seed: int, count: int, lo: int, hi: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(rng.randrange(lo, hi))] for _ in range(count)]


def _assert_same(ours: list[dict], ref: list[dict]) -> None:
    assert [o["output_ids"] for o in ours] == [r["output_ids"] for r in ref]
    for o, r in zip(ours, ref):
        mo, mr = o["meta_info"], r["meta_info"]
        assert mo["cached_tokens"] == mr["cached_tokens"]
        for key in ("input_token_logprobs", "output_token_logprobs"):
            a, b = mo.get(key) or [], mr.get(key) or []
            assert len(a) == len(b)
            for (la, ta, _), (lb, tb, _) in zip(a, b):
                assert ta == tb
                assert (la is None and lb is None) or la == pytest.approx(lb, abs=LOGPROB_TOL)


def _scenarios() -> dict[str, tuple[dict, list[dict]]]:
    greedy = {"temperature": 0.0, "ignore_eos": True}
    lp = dict(return_logprob=True, logprob_start_len=0)
    rng = random.Random(7)
    base = [rng.randrange(3, 256) for _ in range(40)]
    shared = [base + [10, 11, 12], base + [20, 21], base[:36] + [30, 31], [5, 6, 7, 8, 9]]
    return {
        # Prompts prefilled 7 tokens a step, beside running decodes; pages of 16.
        "chunked_prefill": (dict(chunked_prefill_size=7, page_size=16),
                            [dict(input_ids=_prompts(1, 3, 9, 30), sampling_params={**greedy, "max_new_tokens": 6},
                                  **lp)]),
        # The second round reads whole prompts from the prefix cache.
        # (Output logprobs only: positions whose input logprobs are asked for are computed, not cached.)
        "prefix_cache": (dict(), [dict(input_ids=shared, sampling_params={**greedy, "max_new_tokens": 5},
                                       return_logprob=True)] * 2),
        # A pool of 80 tokens cannot hold three requests of up to 54: one is retracted and redone.
        "retraction": (dict(context_length=64, max_total_tokens=80, chunked_prefill_size=16),
                       [dict(input_ids=_prompts(3, 3, 14, 24), sampling_params={**greedy, "max_new_tokens": 30},
                             return_logprob=True)]),
    }


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir) -> str:
    return tiny_model_dir("llama")   # 4 query heads over 2 KV heads


@needs_interpreter
@pytest.mark.parametrize("scenario", ["chunked_prefill", "prefix_cache", "retraction"])
def test_engine_triton_backend_matches_torch(interpreter, tiny_llama, scenario):
    engine_args, calls = _scenarios()[scenario]
    ref = run_engine(tiny_llama, {**engine_args, "attention_backend": "torch"}, calls)
    ours = interpreter(run_engine, tiny_llama, {**engine_args, "attention_backend": "triton"}, calls)
    assert ours["backend"] == "TritonAttentionBackend" and ref["backend"] == "TorchAttentionBackend"
    assert ours["idle_clean"] and ours["num_retractions"] == ref["num_retractions"]
    for o, r in zip(ours["outputs"], ref["outputs"]):
        _assert_same(o, r)
    if scenario == "prefix_cache":
        assert [o["meta_info"]["cached_tokens"] for o in ours["outputs"][1]] == [42, 41, 37, 4]
    if scenario == "retraction":
        assert ours["num_retractions"] > 0


# --- compiled for the GPU, on CPU ------------------------------------------------------------------

# H100 and H200 are sm_90, with 227 KiB of shared memory per block.
SM90_SHARED_MEMORY = 232448
INDEX_POINTERS = {"PageTable": "*i64", "SeqLens": "*i64", "Slots": "*i64", "PrefixLens": "*i64",
                  "ExtendLens": "*i64", "QStarts": "*i64", "MidO": "*fp32", "MidLse": "*fp32"}


def _kernel(name: str):
    from kernels.triton import decode_attention, extend_attention, kv_store

    return {"decode_split": decode_attention._decode_split, "decode_merge": decode_attention._decode_merge,
            "extend": extend_attention._extend, "store_kv": kv_store._store_kv}[name]


# Shapes of SmolLM2-135M (9 heads over 3 KV heads) and Qwen2.5-0.5B (14 over 2), head_dim 64; the block
# sizes are those the launchers pick.
COMPILE_CASES = [
    ("store_kv", "*bf16", dict(NUM_HEADS=2, HEAD_DIM=64, BLOCK_T=16, BLOCK_HD=128)),
    ("decode_split", "*bf16", dict(GROUP=7, HEAD_DIM=64, NUM_SPLITS=4, HAS_WINDOW=False, DOT_FP32=False,
                                   BLOCK_H=16, BLOCK_D=64, BLOCK_N=64)),
    ("decode_split", "*fp32", dict(GROUP=3, HEAD_DIM=64, NUM_SPLITS=1, HAS_WINDOW=True, DOT_FP32=True,
                                   BLOCK_H=16, BLOCK_D=64, BLOCK_N=32)),
    ("decode_merge", "*bf16", dict(HEAD_DIM=64, NUM_SPLITS=4, BLOCK_S=4, BLOCK_D=64)),
    ("extend", "*bf16", dict(GROUP=7, HEAD_DIM=64, HAS_WINDOW=False, DOT_FP32=False, BLOCK_M=64, BLOCK_N=64,
                             BLOCK_D=64)),
    ("extend", "*fp32", dict(GROUP=3, HEAD_DIM=64, HAS_WINDOW=True, DOT_FP32=True, BLOCK_M=32, BLOCK_N=32,
                             BLOCK_D=64)),
]


@pytest.mark.parametrize("name,data_type,constexprs", COMPILE_CASES,
                         ids=[f"{n}-{t[1:]}-{c.get('NUM_SPLITS', '')}" for n, t, c in COMPILE_CASES])
def test_kernel_compiles_for_sm90(name, data_type, constexprs):
    """The GPU compiler's checks (tl.dot shapes, types, shared memory) without a GPU: Triton compiles to
    a cubin for sm_90 on any machine, with the ptxas it ships."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if triton.knobs.runtime.interpret:
        pytest.skip("this process runs Triton's interpreter (TRITON_INTERPRET=1): nothing to compile")
    fn = _kernel(name)
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg[0].isupper():       # pointers are capitalised
            signature[arg] = INDEX_POINTERS.get(arg, data_type)
        else:
            signature[arg] = "fp32" if arg.startswith("scale") else "i32"
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"]
    assert compiled.metadata.shared <= SM90_SHARED_MEMORY


# --- on a GPU ---------------------------------------------------------------------------------------


@gpu_test
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_store_kv_gpu(dtype, page_size):
    ours, ref = store_case(dtype, page_size, device="cuda")
    assert torch.equal(ours, ref)


@gpu_test
@pytest.mark.parametrize("dtype,page_size,num_splits,window,group", DECODE_CASES)
def test_decode_attention_gpu(dtype, page_size, num_splits, window, group):
    out, ref = decode_case(dtype, page_size, num_splits, window, group, device="cuda")
    _close(out, ref, dtype)


@gpu_test
@pytest.mark.parametrize("dtype,page_size,window,group", EXTEND_CASES)
def test_extend_attention_gpu(dtype, page_size, window, group):
    out, ref = extend_case(dtype, page_size, window, group, device="cuda")
    _close(out, ref, dtype)


@gpu_test
@pytest.mark.parametrize("dtype,splits", [(torch.float32, None), (torch.float32, 3), (torch.bfloat16, 2)])
def test_backend_mixed_batch_matches_torch_backend_gpu(dtype, splits):
    r = backend_case(dtype, 16, None, splits, device="cuda")
    assert torch.equal(r["triton_pool"], r["torch_pool"])
    _close(r["triton"], r["torch"], dtype)


@gpu_test
@pytest.mark.parametrize("scenario", ["chunked_prefill", "prefix_cache", "retraction"])
def test_engine_triton_backend_matches_torch_gpu(tiny_llama, scenario):
    engine_args, calls = _scenarios()[scenario]
    engine_args = {**engine_args, "device": "cuda", "dtype": "float32"}
    ref = run_engine(tiny_llama, {**engine_args, "attention_backend": "torch"}, calls)
    ours = run_engine(tiny_llama, {**engine_args, "attention_backend": "triton"}, calls)
    assert ours["backend"] == "TritonAttentionBackend" and ours["idle_clean"]
    assert ours["num_retractions"] == ref["num_retractions"]
    for o, r in zip(ours["outputs"], ref["outputs"]):
        _assert_same(o, r)


# --- device seams, on CPU ---------------------------------------------------------------------------


def test_torch_backend_builds_its_tensors_on_the_batch_device():
    """With the default device set to meta, a tensor built without device= lands on meta and any op
    mixing it with the batch's (CPU) tensors raises: the check a CUDA batch would make."""
    from runtime.attention.registry import create_attention_backend
    from runtime.kv_pool import KVPool

    pool = KVPool(1, triton_cases.NUM_SLOTS, 2, 16, torch.float32, "cpu")
    backend = create_attention_backend("torch", pool)
    batch = triton_cases.mixed_batch(page_size=1)
    q, k, v = torch.randn(batch.num_tokens, 6, 16), torch.randn(batch.num_tokens, 2, 16), torch.randn(
        batch.num_tokens, 2, 16)
    with torch.device("meta"):
        backend.prepare(batch)
        out = backend.forward(q, k, v, 0, batch, 0.3)
        windowed = backend.forward(q, k, v, 0, batch, 0.3, sliding_window=8)
    assert out.device.type == "cpu" and windowed.device.type == "cpu" and not out.isnan().any()


def test_attention_backend_default_depends_on_device():
    from runtime.server_args import ServerArgs

    assert ServerArgs(device="cpu").attention_backend == "torch"
    assert ServerArgs(device="cuda").attention_backend == "triton"
    assert ServerArgs(device="cuda:1").attention_backend == "triton"
    assert ServerArgs(device="cpu", attention_backend="triton").attention_backend == "triton"


def test_unknown_backend_names_the_choices():
    from runtime.attention.registry import create_attention_backend
    from runtime.kv_pool import KVPool

    with pytest.raises(ValueError, match=r"'nope'.*flashinfer.*torch.*triton"):
        create_attention_backend("nope", KVPool(1, 8, 1, 8, torch.float32, "cpu"))


def test_triton_backend_refuses_cpu_outside_the_interpreter():
    import triton

    if triton.knobs.runtime.interpret:
        pytest.skip("this process runs Triton's interpreter (TRITON_INTERPRET=1)")
    from runtime.attention.registry import create_attention_backend
    from runtime.kv_pool import KVPool

    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        create_attention_backend("triton", KVPool(1, 8, 1, 8, torch.float32, "cpu"))


def test_only_kernels_import_triton():
    root = Path(__file__).resolve().parents[1]
    for folder in ("rollout", "runtime", "sync", "trainer_examples", "benchmarks"):
        for path in (root / folder).rglob("*.py"):
            for line in path.read_text().splitlines():
                assert not re.match(r"\s*(import|from)\s+triton\b", line), f"{path} imports triton: {line}"


NO_TRITON = """
import sys
sys.modules["triton"] = None   # as if triton were not installed: importing it raises ImportError
import kernels, kernels.triton
from runtime.engine import Engine
eng = Engine(sys.argv[1], skip_tokenizer_init=True, progress=False, max_total_tokens=256)
out = eng.generate(input_ids=[5, 6, 7], sampling_params={"temperature": 0.0, "max_new_tokens": 2})
eng.shutdown()
assert len(out["output_ids"]) == 2, out
try:
    import runtime.attention.triton_backend
except ImportError as e:
    print("triton backend:", e)
"""


def test_torch_path_runs_without_triton(tiny_llama):
    done = subprocess.run([sys.executable, "-c", NO_TRITON, tiny_llama], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "triton backend: import of triton halted" in done.stdout
