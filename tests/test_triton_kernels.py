"""The Triton kernels of kernels/triton/ (RMSNorm with the fused residual add, rotary, sampling) against
their torch references.

On every machine the kernels run under Triton's interpreter on CPU tensors, in a child process
(tests/triton_interpret.py, so TRITON_INTERPRET never reaches another test), and are compiled offline
for an H100/H200 (sm_90) in another. With CUDA, the `gpu` tests run the same checks compiled on the
GPU. Outputs start as NaN (token outputs as -1), so an element a kernel forgets to write fails.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

DTYPES = ("float32", "float16", "bfloat16")
ROPE_TYPES = ("default", "linear", "llama3")
ROOT = Path(__file__).resolve().parents[1]

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    # bf16: two ulps, because the interpreter rounds fp32 -> bf16 toward zero (a GPU rounds to nearest).
    return {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-3),
            torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}[dtype]


# ----------------------------------------------------------------------------------------------
# Checks: module-level functions, run in the interpreter's child process or on a GPU here
# ----------------------------------------------------------------------------------------------


def check_rms_norm(device: str, dtype_name: str, residual: bool) -> None:
    from kernels.rmsnorm import add_rms_norm, add_rms_norm_torch, rms_norm, rms_norm_torch
    from kernels.triton.rmsnorm import rms_norm_triton

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    # Leading dims, a width that is not a power of two, and rows that are not contiguous.
    x = (torch.randn(5, 3, 2, 48, generator=g) * 2)[:, :, 0].to(device, dtype)
    res = torch.randn(5, 3, 48, generator=g).to(device, dtype)
    weight = (1 + 0.2 * torch.randn(48, generator=g)).to(device, dtype)
    out = torch.full(x.shape, float("nan"), dtype=dtype, device=device)
    summed = torch.full(x.shape, float("nan"), dtype=dtype, device=device)
    if residual:
        got, got_sum = rms_norm_triton(x, res, weight, 1e-6, out=out, summed_out=summed)
        want, want_sum = add_rms_norm_torch(x, res, weight, 1e-6)
        torch.testing.assert_close(got_sum, want_sum, **_tolerance(dtype))
        assert got_sum.data_ptr() == summed.data_ptr()
        via_dispatch = add_rms_norm(x, res, weight, 1e-6, impl="triton")
        assert torch.equal(via_dispatch[0], got) and torch.equal(via_dispatch[1], got_sum)
    else:
        got, none = rms_norm_triton(x, None, weight, 1e-6, out=out)
        want = rms_norm_torch(x, weight, 1e-6)
        assert none is None
        assert torch.equal(rms_norm(x, weight, 1e-6, impl="triton"), got)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, want, **_tolerance(dtype))


def _rotary_tables(rope_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import LlamaConfig

    from runtime.models.layers import RotaryTable

    scaling = {"default": None,
               "linear": {"rope_type": "linear", "factor": 4.0},
               "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 32}}[rope_type]
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rope_scaling=scaling)
    table = RotaryTable(config, head_dim=16, max_positions=128)
    return table.cos, table.sin


def check_rotary(device: str, dtype_name: str, rope_type: str) -> None:
    from kernels.rotary import apply_rotary, prepare_rotary, rotary_torch
    from kernels.triton.rotary import rotary_triton

    dtype = getattr(torch, dtype_name)
    cos, sin = (t.to(device) for t in _rotary_tables(rope_type))
    if rope_type != "default":  # the scalings must reach the tables, or this checks nothing new
        assert not torch.allclose(cos, _rotary_tables("default")[0].to(device))
    g = torch.Generator().manual_seed(1)
    t = 9
    qkv = torch.randn(t, (4 + 2 * 2) * 16, generator=g).to(device, dtype)
    q, k = qkv[:, :64].view(t, 4, 16), qkv[:, 64:96].view(t, 2, 16)  # strided views, as the model has them
    positions = torch.randperm(128, generator=g)[:t].to(device)
    q_out = torch.full(q.shape, float("nan"), dtype=dtype, device=device)
    k_out = torch.full(k.shape, float("nan"), dtype=dtype, device=device)
    got_q, got_k = rotary_triton(q, k, positions, cos, sin, q_out=q_out, k_out=k_out)
    want_q, want_k = rotary_torch(q, k, positions, cos, sin)
    assert got_q.data_ptr() == q_out.data_ptr() and got_k.data_ptr() == k_out.data_ptr()
    torch.testing.assert_close(got_q, want_q, **_tolerance(dtype))
    torch.testing.assert_close(got_k, want_k, **_tolerance(dtype))
    via_q, via_k = apply_rotary(q, k, prepare_rotary(positions, cos, sin, dtype, impl="triton"))
    assert torch.equal(via_q, got_q) and torch.equal(via_k, got_k)


# (top_k, top_p, min_p); top_k None is off, "V-1" one less than the vocabulary.
SAMPLING_CONFIGS = [(None, 1.0, 0.0), (None, 1.0, 0.1), (1, 1.0, 0.0), (2, 1.0, 0.0), (5, 1.0, 0.0),
                    (40, 1.0, 0.05), (None, 0.1, 0.0), (None, 0.5, 0.0), (None, 0.9, 0.0), (None, 0.99, 0.0),
                    (20, 0.8, 0.0), (None, 0.95, 0.2), ("V-1", 1.0, 0.0), (7, 0.3, 0.5)]


def _compare_draws(device: str, probs: torch.Tensor, u: torch.Tensor, top_k: list[int], top_p: list[float],
                   min_p: list[float]) -> None:
    from kernels.sampling import draw_tokens, draw_tokens_torch
    from kernels.triton.sampling import draw_tokens_triton

    want = draw_tokens_torch(probs.clone(), u, top_k, top_p, min_p)
    out = torch.full((probs.shape[0],), -1, dtype=torch.int64, device=device)
    got = draw_tokens_triton(probs.to(device), u.to(device), top_k, top_p, min_p, out=out).cpu()
    bad = (got != want).nonzero().flatten().tolist()
    assert not bad, [(r, top_k[r], top_p[r], min_p[r], float(u[r]), int(want[r]), int(got[r])) for r in bad[:10]]
    if device == "cuda":  # the dispatch picks the kernel for CUDA tensors
        assert torch.equal(draw_tokens(probs.to(device), u.to(device), top_k, top_p, min_p).cpu(), want)


def check_sampling_random_rows(device: str, vocab: int, rows: int, seed: int) -> None:
    from runtime.sampler import seeded_uniform

    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(rows, 1, generator=g) * 8 + 0.5  # flat to peaked
    logits = torch.randn(rows, vocab, generator=g) * scale
    masked = (torch.rand(rows, vocab, generator=g) < 0.3) & (torch.arange(rows)[:, None] % 3 == 0)
    probs = torch.softmax(logits.masked_fill(masked, float("-inf")), dim=-1)  # some rows with zeros
    u = seeded_uniform(torch.randint(-2**62, 2**62, (rows,), generator=g), torch.randint(0, 500, (rows,), generator=g))
    configs = [SAMPLING_CONFIGS[(i + seed) % len(SAMPLING_CONFIGS)] for i in range(rows)]
    top_k = [vocab if k is None else vocab - 1 if k == "V-1" else k for k, _, _ in configs]
    _compare_draws(device, probs, u, top_k, [p for _, p, _ in configs], [m for _, _, m in configs])


def check_sampling_ties(device: str) -> None:
    """Rows built from exact binary fractions, so top-k and top-p cuts fall inside runs of equal
    probabilities (the reference keeps the lowest ids among them) or exactly on their ends."""
    from runtime.sampler import seeded_uniform

    vocab = 300
    spiky = torch.zeros(vocab)
    spiky[7] = 0.25
    spiky[[3, 50, 120, 299]] = 0.125  # ties, spread over both CDF blocks
    spiky[10:30] = 0.0125
    uniform = torch.full((vocab,), 1.0 / vocab)
    half = torch.zeros(vocab)
    half[::2] = 1.0 / 150
    cases = [(spiky, k, p, m) for k, p, m in [
        (3, 1.0, 0.0), (1, 1.0, 0.0), (5, 1.0, 0.0), (6, 1.0, 0.0), (25, 1.0, 0.0), (26, 1.0, 0.0),
        (vocab, 0.5, 0.0), (vocab, 0.75, 0.0), (vocab, 0.3, 0.0), (vocab, 0.25, 0.0), (3, 1.0, 0.5),
        (vocab, 1.0, 0.5), (vocab, 1.0, 0.05), (2, 0.5, 0.0)]]
    cases += [(uniform, k, p, m) for k, p, m in [(10, 1.0, 0.0), (vocab, 0.05, 0.0), (vocab, 1.0, 1.0)]]
    cases += [(half, k, p, m) for k, p, m in [(149, 1.0, 0.0), (151, 1.0, 0.0), (vocab, 0.5, 0.0)]]
    draws = 4
    probs = torch.stack([row for row, _, _, _ in cases for _ in range(draws)])
    u = seeded_uniform(torch.arange(probs.shape[0]), torch.zeros(probs.shape[0], dtype=torch.int64))
    _compare_draws(device, probs, u, [k for _, k, _, _ in cases for _ in range(draws)],
                   [p for _, _, p, _ in cases for _ in range(draws)], [m for _, _, _, m in cases for _ in range(draws)])


def check_block_sums_follow_torch(device: str, vocab: int, rows: int) -> None:
    """The fp32 256-token block sums of the two-level scan equal torch's CPU sums bit for bit (full
    blocks, and last blocks shorter than a vector, of whole vectors, or with left-over vectors)."""
    from kernels.sampling import CDF_BLOCK
    from kernels.triton.sampling import launch_sampling

    g = torch.Generator().manual_seed(vocab)
    probs = torch.softmax(torch.randn(rows, vocab, generator=g) * 4, dim=-1)
    full = vocab // CDF_BLOCK
    parts = []
    if full:
        parts.append(probs[:, : full * CDF_BLOCK].reshape(rows, full, CDF_BLOCK).sum(dim=-1))
    if vocab % CDF_BLOCK:
        parts.append(probs[:, full * CDF_BLOCK:].sum(dim=-1, keepdim=True))
    want = torch.cat(parts, dim=1)
    out = torch.full((rows,), -1, dtype=torch.int64, device=device)
    got = launch_sampling(probs.to(device), torch.full((rows,), 0.5, dtype=torch.float64, device=device),
                          torch.full((rows,), vocab, dtype=torch.int64, device=device),
                          torch.ones(rows, dtype=torch.float64, device=device),
                          torch.zeros(rows, dtype=torch.float32, device=device),
                          torch.arange(rows, device=device), False, out).cpu()
    assert torch.equal(got, want), (got - want).abs().max()
    assert bool((out >= 0).all())


def compile_kernels_for_sm90() -> list[str]:
    """Compile every kernel for an H100/H200 without one (Triton's own ptxas), so a kernel the GPU
    compiler rejects fails here, not first on the GPU machine."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels.sampling import CDF_BLOCK
    from kernels.triton import rmsnorm, rotary, sampling

    target = GPUTarget("cuda", 90, 32)
    built = []

    def build(fn, signature: dict[str, str], constexprs: dict, **options) -> None:
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target,
                       options=options or None)
        built.append(f"{fn.__name__}{sorted(constexprs.items())}")

    for dtype in ("fp32", "bf16"):
        for has_residual in (False, True):
            build(rmsnorm._rms_norm_kernel,
                  {"X": f"*{dtype}", "R": f"*{dtype}", "W": f"*{dtype}", "Out": f"*{dtype}", "SumOut": f"*{dtype}",
                   "stride_x": "i32", "stride_r": "i32", "stride_o": "i32", "stride_s": "i32", "n_cols": "i32",
                   "eps": "fp32"}, {"HAS_RESIDUAL": has_residual, "BLOCK": 1024})
        build(rotary._rotary_kernel,
              {"X": f"*{dtype}", "Out": f"*{dtype}", "Positions": "*i64", "Cos": "*fp32", "Sin": "*fp32",
               "stride_xt": "i32", "stride_xh": "i32", "stride_ot": "i32", "stride_oh": "i32", "stride_cos": "i32",
               "stride_sin": "i32", "num_heads": "i32"}, {"HALF": 32, "BLOCK_H": 16, "BLOCK_D": 32},
              enable_fp_fusion=False)
    for truncate in (False, True):
        build(sampling._sample_kernel,
              {"Probs": "*fp32", "U": "*fp64", "TopK": "*i64", "TopP": "*fp64", "MinP": "*fp32", "Rows": "*i64",
               "BlockSums": "*fp32", "BlockCdfs": "*fp64", "Work": "*fp32", "Out": "*i64", "stride_p": "i32",
               "stride_bs": "i32", "stride_work": "i32", "vocab": "i32"},
              {"TRUNCATE": truncate, "BLOCK": 2048, "CDF_BLOCK": CDF_BLOCK, "LANES": sampling.CPU_SUM_LANES,
               "ILP": sampling._ILP, "RADIX_BITS": sampling._RADIX_BITS, "SEARCH_STEPS": sampling._SEARCH_STEPS,
               "SEARCH_BLOCK": sampling._SEARCH_BLOCK}, num_warps=8, enable_fp_fusion=False)
    return built


# ----------------------------------------------------------------------------------------------
# Under the interpreter, on CPU tensors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("residual", [False, True], ids=["norm", "add_norm"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_interpreted(triton_interpreter, dtype, residual) -> None:
    triton_interpreter.run(check_rms_norm, "cpu", dtype, residual)


@pytest.mark.parametrize("rope_type", ROPE_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_interpreted(triton_interpreter, dtype, rope_type) -> None:
    triton_interpreter.run(check_rotary, "cpu", dtype, rope_type)


@pytest.mark.parametrize("vocab, rows, seed", [(300, 42, 0), (259, 28, 1), (512, 14, 2)])
def test_sampling_picks_the_references_token_interpreted(triton_interpreter, vocab, rows, seed) -> None:
    triton_interpreter.run(check_sampling_random_rows, "cpu", vocab, rows, seed)


def test_sampling_ties_at_the_cut_interpreted(triton_interpreter) -> None:
    triton_interpreter.run(check_sampling_ties, "cpu")


@pytest.mark.parametrize("vocab, rows", [(256, 2), (259, 2), (260, 1), (263, 2), (264, 2), (300, 1), (511, 2),
                                         (520, 2), (777, 1)])
def test_sampling_block_sums_follow_torch_interpreted(triton_interpreter, vocab, rows) -> None:
    triton_interpreter.run(check_block_sums_follow_torch, "cpu", vocab, rows)


def test_kernels_compile_for_sm90(triton_compiler) -> None:
    built = triton_compiler.run(compile_kernels_for_sm90)
    assert len(built) == 2 * 2 + 2 + 2, built  # rmsnorm: 2 dtypes x residual or not; rotary: 2 dtypes; sampling: 2


def test_cpu_path_never_imports_triton() -> None:
    """A CPU forward pass and sampling step through kernels/ leave triton unimported (it is imported
    lazily, for CUDA tensors), and impl="triton" on CPU tensors outside the interpreter is refused."""
    code = """
import sys, torch
from kernels.implementation import choose_implementation
from kernels.rmsnorm import add_rms_norm
from kernels.rotary import apply_rotary, prepare_rotary
from kernels.sampling import draw_tokens
x = torch.randn(3, 8)
add_rms_norm(x, x, torch.ones(8), 1e-6)
q = torch.randn(3, 2, 8)
apply_rotary(q, q, prepare_rotary(torch.arange(3), torch.randn(4, 8), torch.randn(4, 8), torch.float32))
draw_tokens(torch.softmax(x, -1), torch.full((3,), 0.5, dtype=torch.float64), [2, 8, 8], [1.0, 0.5, 1.0], [0.0] * 3)
try:
    choose_implementation("triton", torch.device("cpu"))
except ValueError as e:
    print("refused:", e)
assert "triton" not in sys.modules, "triton was imported"
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "refused:" in proc.stdout or "triton package" in proc.stdout, proc.stdout


# ----------------------------------------------------------------------------------------------
# Compiled, on a CUDA GPU
# ----------------------------------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("residual", [False, True], ids=["norm", "add_norm"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_on_gpu(dtype, residual) -> None:
    check_rms_norm("cuda", dtype, residual)


@gpu
@needs_cuda
@pytest.mark.parametrize("rope_type", ROPE_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_on_gpu(dtype, rope_type) -> None:
    check_rotary("cuda", dtype, rope_type)


@gpu
@needs_cuda
@pytest.mark.parametrize("vocab, rows, seed", [(300, 256, 0), (259, 128, 1), (49152, 64, 2), (151936, 32, 3)])
def test_sampling_picks_the_references_token_on_gpu(vocab, rows, seed) -> None:
    check_sampling_random_rows("cuda", vocab, rows, seed)


@gpu
@needs_cuda
def test_sampling_ties_at_the_cut_on_gpu() -> None:
    check_sampling_ties("cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("vocab", [256, 259, 264, 300, 49152, 151936])
def test_sampling_block_sums_follow_torch_on_gpu(vocab) -> None:
    check_block_sums_follow_torch("cuda", vocab, 4)
