"""Decode steps through runtime/cuda_graph_runner.py: static buffers, padded buckets, fixed-width page tables.

On CPU the static-buffer path runs eagerly (capture=False) with the Triton backend under the interpreter:
a batch that shrinks from 5 requests to 1 runs through buckets 4, 2 and 1 (padded rows, page tables a
whole context wide) and falls back to the ordinary path when it does not fit (5 > 4); greedy tokens equal
the torch backend's and logprobs are within 1e-5. On a GPU (`gpu` tests) the graphs are captured and
replayed: same tokens as without graphs, the graphs follow an in-place weight update, and releasing memory
returns it to the device.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from runtime.cuda_graph_runner import graph_batch_sizes

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
LOGPROB_TOL = 1e-5
MAX_BS = 4
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52], [7] * 9,
           [99, 98, 97, 96]]


def _params() -> list[dict]:
    # Different lengths: the decode batch shrinks 5 -> 4 -> 3 -> 2 -> 1 as requests finish.
    return [{"temperature": 0.0, "ignore_eos": True, "max_new_tokens": n} for n in (3, 5, 7, 9, 11)]


def run_decodes(model_path: str, engine_args: dict, static_decode: bool, decode_splits: int | None = None) -> dict:
    """Greedy outputs of PROMPTS; with static_decode the engine's decode steps go through the graph
    runner's static buffers, run eagerly (how the path is tested without a GPU). decode_splits: the
    Triton backend's split count (slices of the reserved split buffers; the interpreter's default is 1)."""
    from runtime.engine import Engine

    eng = Engine(model_path, skip_tokenizer_init=True, progress=False, cuda_graph_max_bs=MAX_BS, **engine_args)
    try:
        if static_decode:
            eng.runner.capture_cuda_graphs(capture=False)
            eng.runner.backend.decode_splits = decode_splits
        out = eng.generate(input_ids=PROMPTS, sampling_params=_params(), return_logprob=True)
        graph = eng.runner.graph_runner
        return {"outputs": out, "replays": graph.num_replays if graph else 0, "steps": eng.scheduler.forward_steps}
    finally:
        eng.shutdown()


def _assert_same(ours: list[dict], ref: list[dict]) -> None:
    assert [o["output_ids"] for o in ours] == [r["output_ids"] for r in ref]
    for o, r in zip(ours, ref):
        a, b = o["meta_info"]["output_token_logprobs"], r["meta_info"]["output_token_logprobs"]
        assert [t for _, t, _ in a] == [t for _, t, _ in b]
        for (la, _, _), (lb, _, _) in zip(a, b):
            assert la == pytest.approx(lb, abs=LOGPROB_TOL)


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir) -> str:
    return tiny_model_dir("llama")


def test_buckets():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(4) == [1, 2, 4]
    assert graph_batch_sizes(5) == [1, 2, 4, 5]
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert graph_batch_sizes(256)[-3:] == [224, 240, 256]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install -e '.[dev]')")
@pytest.mark.parametrize("splits", [None, 3])
def test_static_decode_path_matches_torch_backend(triton_interpreter, tiny_llama, splits):
    args = dict(device="cpu", dtype="float32", max_total_tokens=512, context_length=64)
    ref = run_decodes(tiny_llama, {**args, "attention_backend": "torch"}, static_decode=False)
    ours = triton_interpreter.run(run_decodes, tiny_llama, {**args, "attention_backend": "triton"}, True, splits)
    _assert_same(ours["outputs"], ref["outputs"])
    # 10 decode steps; the two of 5 requests (> 4) are not served from the static buffers.
    assert ours["steps"] == 11 and ours["replays"] == 8, ours


def test_no_graphs_on_cpu(tiny_llama):
    from runtime.engine import Engine

    eng = Engine(tiny_llama, skip_tokenizer_init=True, progress=False, device="cpu", dtype="float32",
                 max_total_tokens=256)
    try:
        assert eng.runner.graph_runner is None and not eng.runner.cuda_graphs_wanted()
    finally:
        eng.shutdown()


# --- on a GPU -----------------------------------------------------------------------------------------


def _cuda_engine(path: str, **kwargs):
    from runtime.engine import Engine

    return Engine(path, skip_tokenizer_init=True, progress=False, device="cuda", max_total_tokens=4096,
                  context_length=128, cuda_graph_max_bs=MAX_BS, **kwargs)


def _greedy(eng) -> list[list[int]]:
    return [o["output_ids"] for o in eng.generate(input_ids=PROMPTS, sampling_params=_params())]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graphs_match_eager_gpu(tiny_llama, dtype):
    with_graphs, without = _cuda_engine(tiny_llama, dtype=dtype), _cuda_engine(tiny_llama, dtype=dtype,
                                                                                disable_cuda_graph=True)
    try:
        assert with_graphs.runner.graph_runner is not None and without.runner.graph_runner is None
        assert _greedy(with_graphs) == _greedy(without)
        assert with_graphs.runner.graph_runner.num_replays == 8
    finally:
        with_graphs.shutdown()
        without.shutdown()


@pytest.mark.gpu
@needs_cuda
def test_graphs_follow_weight_updates_gpu(tiny_llama, checkpoints):
    """Updates copy into the captured parameters in place: the replayed graphs compute with new weights."""
    from safetensors.torch import load_file

    eng, ref_b = _cuda_engine(checkpoints["a"], dtype="float32"), _cuda_engine(checkpoints["b"], dtype="float32")
    try:
        before = _greedy(eng)
        named = list(load_file(f"{checkpoints['b']}/model.safetensors").items())
        ok, msg = eng.update_weights_from_tensor([(n, t.cuda()) for n, t in named])
        assert ok, msg
        replays = eng.runner.graph_runner.num_replays
        after = _greedy(eng)
        assert eng.runner.graph_runner.num_replays > replays
        assert after == _greedy(ref_b) and after != before
    finally:
        eng.shutdown()
        ref_b.shutdown()


@pytest.mark.gpu
@needs_cuda
def test_release_memory_returns_it_to_the_device_gpu(tiny_llama):
    """What a colocated trainer sees: torch.cuda.memory_reserved drops by at least the KV pool."""
    from runtime.engine import Engine

    eng = Engine(tiny_llama, skip_tokenizer_init=True, progress=False, device="cuda", dtype="float32",
                 max_total_tokens=200_000, context_length=128, cuda_graph_max_bs=MAX_BS)   # ~100 MB of KV
    try:
        _greedy(eng)
        kv_bytes = eng.runner.kv_pool.nbytes()
        torch.cuda.synchronize()
        held = torch.cuda.memory_reserved()
        ok, msg = eng.release_memory_occupation()
        assert ok, msg
        assert eng.runner.graph_runner is None
        released = torch.cuda.memory_reserved()
        assert held - released >= kv_bytes, (held, released, kv_bytes)
        ok, msg = eng.resume_memory_occupation()
        assert ok, msg
        assert eng.runner.graph_runner is not None   # captured again over the new addresses
        out = _greedy(eng)
        assert all(len(o) == p["max_new_tokens"] for o, p in zip(out, _params()))
    finally:
        eng.shutdown()
