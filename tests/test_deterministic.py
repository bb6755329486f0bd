"""Deterministic inference (`--enable-deterministic-inference`): bitwise the same tokens and logprobs for a
request whatever else runs, however its prompt is chunked, cached or recomputed, and bitwise the logprobs
the trainer-side forward computes. Every comparison is of bytes, never within a tolerance.
"""

from __future__ import annotations

import random
import struct
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Iterator

import pytest
import torch
import torch.nn.functional as F

from kernels.batch_invariant import KV_CHUNK, MIN_GEMM_ROWS, invariant_attention, invariant_linear, padded_key_len
from kernels.rmsnorm import add_rms_norm, rms_norm
from rollout.server.launch_server import parse_args
from runtime.engine import Engine
from runtime.server_args import ServerArgs
from runtime.trainer_forward import TrainerForward

GREEDY = {"temperature": 0.0, "ignore_eos": True}
LOGPROBS = dict(return_logprob=True, logprob_start_len=0)


# --- the kernels ----------------------------------------------------------------------------------


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def torch_threads(request):
    """The property holds at a given thread count; servers run 1 by default, --num-threads 2 is common."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("k, n", [(576, 960), (1536, 576), (576, 49152), (64, 192), (48, 80), (64, 8), (64, 1), (64, 16)])
def test_linear_rows_do_not_depend_on_the_row_count(k, n, torch_threads):
    """The measured property the mode rests on (MKL picks its kernel from M; from MIN_GEMM_ROWS rows on,
    every row gets the same bits wherever it sits). Narrow outputs (a MoE router's 8 columns, a shared-expert
    gate's 1) get their last rows from another path unless padded: every row is compared."""
    g = torch.Generator().manual_seed(k + n)
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    total = 300 if n < 10000 else 100  # the LM head's shape is slow to sweep
    x = torch.randn(total, k, generator=g)
    alone = torch.cat([invariant_linear(x[i:i + 1], w, b) for i in range(total)])
    for m in (1, 2, 3, MIN_GEMM_ROWS, 5, 6, 7, 9, 10, 11, 17, 37, 64, 99, total):
        assert torch.equal(invariant_linear(x[:m], w, b), alone[:m]), m
    assert torch.equal(invariant_linear(x[3:140], w, b), alone[3:140])  # rows at other offsets


def test_row_wise_ops_do_not_depend_on_the_row_count():
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(300, 576, generator=g), torch.randn(300, 576, generator=g)
    weight = torch.randn(576, generator=g)
    gate_up = torch.randn(300, 2 * 1536, generator=g)
    ops = {"rms_norm": lambda a, res: rms_norm(a, weight, 1e-5),
           "add_rms_norm": lambda a, res: add_rms_norm(a, res, weight, 1e-5)[0],
           "log_softmax": lambda a, res: torch.log_softmax(a, dim=-1),
           "silu(gate) * up": lambda a, res: (lambda gu: F.silu(gu[0]) * gu[1])(a.chunk(2, dim=-1))}
    for name, op in ops.items():
        src = gate_up if name.startswith("silu") else x
        full = op(src, r)
        for i, m in ((0, 1), (5, 1), (7, 3), (11, 40)):
            assert torch.equal(op(src[i:i + m], r[i:i + m]), full[i:i + m]), name


@pytest.mark.parametrize("head_dim, group", [(64, 3), (16, 2), (8, 2)])
def test_attention_row_is_the_same_decoded_prefilled_or_chunked(head_dim, group, torch_threads):
    g = torch.Generator().manual_seed(head_dim)
    hkv, t = 2, 150
    q = torch.randn(t, hkv, group, head_dim, generator=g)
    k, v = torch.randn(t, hkv, head_dim, generator=g), torch.randn(t, hkv, head_dim, generator=g)

    def attend(tokens: list[int], num_keys: int, key_width: int, extra_rows: int = 0) -> torch.Tensor:
        keys = torch.zeros(1, hkv, key_width, head_dim)
        values = torch.zeros(1, hkv, key_width, head_dim)
        keys[0, :, :num_keys], values[0, :, :num_keys] = k[:num_keys].transpose(0, 1), v[:num_keys].transpose(0, 1)
        n = len(tokens)
        rows = q[tokens].permute(1, 0, 2, 3).reshape(1, hkv, n * group, head_dim)
        pos = torch.tensor(tokens).repeat_interleave(group)[None]
        pad = max(n * group, MIN_GEMM_ROWS) + extra_rows - n * group
        rows = torch.cat([rows, torch.zeros(1, hkv, pad, head_dim)], dim=2)
        pos = torch.cat([pos, torch.zeros(1, pad, dtype=torch.long)], dim=1)
        out = invariant_attention(rows, keys, values, pos, torch.tensor([num_keys]), head_dim ** -0.5)
        return out[0, :, :n * group].reshape(hkv, n, group, head_dim).permute(1, 0, 2, 3)

    full = attend(list(range(t)), t, padded_key_len(t))
    for p in range(0, t, 7):
        assert torch.equal(attend([p], p + 1, padded_key_len(p + 1))[0], full[p])
        assert torch.equal(attend([p], p + 1, 4 * KV_CHUNK, extra_rows=5)[0], full[p])
    assert torch.equal(attend(list(range(60, 100)), 100, padded_key_len(100)), full[60:100])


# --- configuration --------------------------------------------------------------------------------


def test_flag_and_alias():
    for flag in ("--enable-deterministic-inference", "--deterministic"):
        args = parse_args([flag, "--device", "cpu"])
        assert args.enable_deterministic_inference and args.deterministic
    assert not parse_args(["--device", "cpu"]).enable_deterministic_inference
    # CUDA runs the mode on the Triton kernels (tests/test_deterministic_gpu.py); other devices are refused.
    from kernels.implementation import triton_installed

    if triton_installed():
        assert ServerArgs(device="cuda", deterministic=True).enable_deterministic_inference
        with pytest.raises(ValueError, match="Triton's interpreter"):   # CPU tensors, Triton, no interpreter
            ServerArgs(device="cpu", deterministic=True, attention_backend="triton")
    else:
        with pytest.raises(ValueError, match="triton package is not installed"):
            ServerArgs(device="cuda", deterministic=True)
    with pytest.raises(ValueError, match="not on device mps"):
        ServerArgs(device="mps", deterministic=True)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_mixture_of_experts_alone_equals_in_a_batch(tiny_model_dir, family):
    # Routing, the experts' grouped products (an expert sees 1 row alone, dozens in the batch), the shared
    # expert and its gate: the target's tokens and logprobs have the same bits alone and among 24 others.
    path = tiny_model_dir(family, max_position_embeddings=512)
    targets = TARGETS[:2]
    with engine(path) as eng:
        alone = [_fingerprint(eng.generate(input_ids=p, sampling_params=sp, **LOGPROBS)) for p, sp in targets]
        eng.flush_cache()
        prompts, params = _mixed_load(5, 24)
        outs = eng.generate(input_ids=[p for p, _ in targets] + prompts,
                            sampling_params=[sp for _, sp in targets] + params, **LOGPROBS)
        assert [_fingerprint(o) for o in outs[:len(targets)]] == alone
    with engine(path, enable_deterministic_inference=False) as eng:  # the default mode's grouping differs
        outs = eng.generate(input_ids=[p for p, _ in targets] + prompts,
                            sampling_params=[sp for _, sp in targets] + params, **LOGPROBS)
        default = [_fingerprint(o) for o in outs[:len(targets)]]
    print(f"{family}: default mode in a batch equals deterministic alone: {default == alone}")


# --- the engine -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_path(tiny_model_dir) -> str:
    return tiny_model_dir("llama", max_position_embeddings=512)


@contextmanager
def engine(model_path: str, **kw: Any) -> Iterator[Engine]:
    kw = {"device": "cpu", "dtype": "float32", "max_total_tokens": 8192, "enable_deterministic_inference": True, **kw}
    eng = Engine(model_path, skip_tokenizer_init=True, progress=False, **kw)
    try:
        yield eng
    finally:
        eng.shutdown()


def _bits(values: list[float | None]) -> bytes:
    return struct.pack(f"{len(values)}d", *[float("nan") if x is None else x for x in values])


def _fingerprint(out: dict) -> tuple:
    """Tokens and the exact bytes of every logprob the request returned."""
    meta = out["meta_info"]
    lps = [x[0] for x in meta.get("output_token_logprobs") or []]
    ins = [x[0] for x in meta.get("input_token_logprobs") or []]
    return tuple(out["output_ids"]), _bits(lps), _bits(ins)


def _prompts(seed: int, count: int, lo: int, hi: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(rng.randrange(lo, hi))] for _ in range(count)]


def _mixed_load(seed: int, count: int) -> tuple[list[list[int]], list[dict]]:
    """Requests of every kind: lengths 3..150, greedy and sampled (top-k / top-p / penalties), 4..40 tokens."""
    rng = random.Random(seed)
    prompts = _prompts(seed, count, 3, 150)
    params = []
    for i in range(count):
        sp: dict = {"max_new_tokens": rng.randrange(4, 40), "ignore_eos": True}
        if i % 3:
            sp.update(temperature=rng.choice([0.6, 1.0, 1.3]), sampling_seed=rng.randrange(1 << 30),
                      top_k=rng.choice([-1, 20]), top_p=rng.choice([1.0, 0.9]))
        else:
            sp.update(temperature=0.0, frequency_penalty=rng.choice([0.0, 0.5]))
        params.append(sp)
    return prompts, params


TARGETS = [(_prompts(100, 1, 90, 91)[0], {**GREEDY, "max_new_tokens": 24}),
           (_prompts(101, 1, 5, 6)[0], {"temperature": 1.0, "sampling_seed": 1234, "max_new_tokens": 24,
                                        "ignore_eos": True}),
           (_prompts(102, 1, 130, 131)[0], {"temperature": 0.7, "top_p": 0.9, "sampling_seed": 7,
                                            "max_new_tokens": 24, "ignore_eos": True})]


@pytest.fixture(scope="module")
def alone(model_path) -> list[tuple]:
    """Each target request run alone in a fresh engine (default chunk size, empty cache)."""
    with engine(model_path) as eng:
        return [_fingerprint(eng.generate(input_ids=p, sampling_params=sp, **LOGPROBS)) for p, sp in TARGETS]


def _targets_in(eng: Engine, load: tuple[list[list[int]], list[dict]]) -> list[tuple]:
    prompts, params = load
    ids = [p for p, _ in TARGETS] + prompts
    outs = eng.generate(input_ids=ids, sampling_params=[sp for _, sp in TARGETS] + params, **LOGPROBS)
    return [_fingerprint(o) for o in outs[:len(TARGETS)]]


def test_alone_equals_in_a_batch_of_64_mixed_requests(model_path, alone):
    with engine(model_path) as eng:
        assert _targets_in(eng, _mixed_load(1, 61)) == alone


@pytest.mark.parametrize("chunk", [16, 64, 2048])
def test_chunked_prefill_size_does_not_change_bits(model_path, alone, chunk):
    with engine(model_path, chunked_prefill_size=chunk) as eng:
        assert _targets_in(eng, _mixed_load(2, 12)) == alone


def test_prefix_cache_hit_does_not_change_bits(model_path):
    # Output logprobs only: prompt logprobs would need every prompt position computed (no cache hit).
    with engine(model_path) as eng:
        ref = [_fingerprint(eng.generate(input_ids=p, sampling_params=sp, return_logprob=True)) for p, sp in TARGETS]
    with engine(model_path, chunked_prefill_size=64) as eng:
        # Cache half of each target's prompt, and a whole one; then the targets read that KV from the cache.
        warm = [p[:len(p) // 2] for p, _ in TARGETS] + [TARGETS[0][0]]
        eng.generate(input_ids=warm, sampling_params={**GREEDY, "max_new_tokens": 3})
        outs = [eng.generate(input_ids=p, sampling_params=sp, return_logprob=True) for p, sp in TARGETS]
    assert all(o["meta_info"]["cached_tokens"] > 0 for o in outs)
    assert [_fingerprint(o) for o in outs] == ref


def test_retraction_does_not_change_bits(model_path):
    prompts = _prompts(3, 6, 20, 50)
    sp = {**GREEDY, "max_new_tokens": 60}
    with engine(model_path) as roomy:
        ref = [_fingerprint(o) for o in roomy.generate(input_ids=prompts, sampling_params=sp, **LOGPROBS)]
        assert roomy.scheduler.num_retractions == 0
    with engine(model_path, context_length=128, max_total_tokens=144, chunked_prefill_size=48) as tight:
        out = [_fingerprint(o) for o in tight.generate(input_ids=prompts, sampling_params=sp, **LOGPROBS)]
        assert tight.scheduler.num_retractions > 0
    assert out == ref


def test_200_greedy_runs_under_concurrent_load_give_one_completion(model_path):
    prompt = _prompts(7, 1, 40, 41)[0]
    load_prompts, load_params = _mixed_load(8, 40)
    with engine(model_path) as eng, ThreadPoolExecutor(4) as pool:
        def one_call(i: int) -> list[tuple]:
            # Each call: 50 copies of the prompt among 10 other requests, so batches mix in every way.
            ids = [prompt] * 50 + load_prompts[i * 10:(i + 1) * 10]
            params = [{**GREEDY, "max_new_tokens": 16}] * 50 + load_params[i * 10:(i + 1) * 10]
            outs = eng.generate(input_ids=ids, sampling_params=params, return_logprob=True)  # cache hits
            return [_fingerprint(o) for o in outs[:50]]
        runs = [fp for part in pool.map(one_call, range(4)) for fp in part]
    assert len(runs) == 200
    assert len(set(runs)) == 1


def test_seeded_sampling_is_reproducible_under_load(model_path):
    prompts = _prompts(9, 8, 5, 60)
    params = [{"temperature": 1.0, "sampling_seed": 100 + i, "max_new_tokens": 20, "ignore_eos": True}
              for i in range(8)]
    with engine(model_path) as eng:
        quiet = [_fingerprint(eng.generate(input_ids=p, sampling_params=sp, **LOGPROBS)) for p, sp in zip(prompts, params)]
    load_prompts, load_params = _mixed_load(10, 40)
    with engine(model_path, chunked_prefill_size=32) as eng:
        outs = eng.generate(input_ids=load_prompts[:20] + prompts + load_prompts[20:],
                            sampling_params=load_params[:20] + params + load_params[20:], **LOGPROBS)
    assert [_fingerprint(o) for o in outs[20:28]] == quiet


def test_prompt_logprobs_equal_decode_logprobs(model_path):
    prompts = _prompts(11, 4, 5, 100)
    with engine(model_path) as eng:
        decoded = eng.generate(input_ids=prompts, sampling_params={"temperature": 1.0, "sampling_seed": 5,
                                                                   "max_new_tokens": 30, "ignore_eos": True},
                               return_logprob=True)
        eng.flush_cache()
        for p, d in zip(prompts, decoded):
            whole = eng.generate(input_ids=p + d["output_ids"], sampling_params={**GREEDY, "max_new_tokens": 1},
                                 **LOGPROBS)
            prefilled = [x[0] for x in whole["meta_info"]["input_token_logprobs"]][len(p):]
            assert _bits(prefilled) == _bits([x[0] for x in d["meta_info"]["output_token_logprobs"]])


# --- the trainer side -----------------------------------------------------------------------------


def _assert_trainer_matches_rollout(path: str, hf_model: torch.nn.Module, prompts: list[list[int]],
                                    new_tokens: int, **engine_kw: Any) -> None:
    sp = {"temperature": 1.0, "sampling_seed": 3, "max_new_tokens": new_tokens, "ignore_eos": True}
    with engine(path, **engine_kw) as eng:
        outs = eng.generate(input_ids=prompts, sampling_params=sp, return_logprob=True)
    hf_model.train()
    forward = TrainerForward(hf_model)
    logps = forward.token_logprobs([p + o["output_ids"] for p, o in zip(prompts, outs)], [len(p) for p in prompts])
    for lp, o in zip(logps, outs):
        assert _bits(lp.detach().tolist()) == _bits([x[0] for x in o["meta_info"]["output_token_logprobs"]])
    sum(lp.sum() for lp in logps).backward()  # ordinary gradients reach the transformers parameters
    grads = [p.grad for p in hf_model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen2"])
def test_trainer_forward_equals_rollout_bitwise(tiny_model_dir, family):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir(family, max_position_embeddings=512)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    _assert_trainer_matches_rollout(path, model, _prompts(12, 6, 3, 90), 20)


@pytest.mark.slow
def test_trainer_forward_equals_rollout_bitwise_on_smollm2():
    from transformers import AutoModelForCausalLM

    from runtime.default_model import default_model_path

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompts = [[t + 1000 for t in p] for p in _prompts(13, 4, 10, 60)]  # ordinary tokens, not specials
    _assert_trainer_matches_rollout(path, model, prompts, 16, max_total_tokens=4096)


def test_default_mode_keeps_its_backend_and_layers(model_path):
    from torch import nn

    with engine(model_path, enable_deterministic_inference=False) as eng:
        assert type(eng.runner.backend).__name__ == "TorchAttentionBackend"
        assert all(type(m) is nn.Linear for m in eng.runner.model.modules() if isinstance(m, nn.Linear))
    with engine(model_path) as eng:
        assert type(eng.runner.backend).__name__ == "BatchInvariantAttentionBackend"
