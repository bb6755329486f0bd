"""The expert distribution record (Engine.start_/stop_/dump_expert_distribution_record; the HTTP routes in
tests/test_routed_experts_server.py).

Oracle: a count made from transformers' router logits on the same sequences: for every position that ran
through the engine's model (prompt + output[:-1]; the prefix cache is off, so no hit skips any), the top-k of
each MoE layer's router logits, counted per layer and expert. The dump's safetensors file, its CSV and its
summary must all say the same.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from runtime.engine import Engine
from runtime.expert_distribution import DIR_ENV
from tests.test_routing_replay import _hf, _hf_routing

SAMPLING = {"temperature": 1.0, "max_new_tokens": 4, "ignore_eos": True, "sampling_seed": 3}


def _prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=gen).tolist() for n in lengths]


def _engine(path: str, **kw) -> Engine:
    return Engine(path, **{**dict(skip_tokenizer_init=True, max_total_tokens=2048, chunked_prefill_size=16,
                                  disable_radix_cache=True, device="cpu", dtype="float32", progress=False), **kw})


def _hf_counts(hf: torch.nn.Module, sequences: list[list[int]], num_experts: int = 8) -> torch.Tensor:
    counts = 0
    for seq in sequences:
        routing = _hf_routing(hf, seq[:-1])  # [T, layers, k]
        counts = counts + torch.stack([torch.bincount(routing[:, j].reshape(-1), minlength=num_experts)
                                       for j in range(routing.shape[1])])
    return counts


def _run(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    outs = engine.generate(input_ids=prompts, sampling_params=SAMPLING)
    return [p + o["output_ids"] for p, o in zip(prompts, outs)]


def _csv_counts(text: str, layer_ids: list[int], num_experts: int = 8) -> torch.Tensor:
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["layer_id", "expert_id", "count"]
    counts = torch.zeros(len(layer_ids), num_experts, dtype=torch.int64)
    for layer, expert, count in rows[1:]:
        counts[layer_ids.index(int(layer)), int(expert)] = int(count)
    return counts


def check_dump(report: dict, want: torch.Tensor, num_tokens: int, layer_ids: list[int]) -> dict:
    """The dump's files and summary against the oracle's counts; returns the safetensors tensors."""
    tensors = load_file(report["path"])
    assert torch.equal(tensors["counts"], want)
    assert tensors["layer_ids"].tolist() == layer_ids
    assert torch.equal(_csv_counts(Path(report["csv_path"]).read_text(), layer_ids), want)
    summary = report["summary"]
    assert summary["num_tokens"] == num_tokens and summary["layer_ids"] == layer_ids
    imbalance = (want.max(dim=1).values.double() / want.double().mean(dim=1)).tolist()
    assert summary["load_imbalance"] == pytest.approx(imbalance)
    assert summary["max_load_imbalance"] == pytest.approx(max(imbalance))
    return tensors


@pytest.mark.parametrize("family, overrides", [("qwen3_moe", {"mlp_only_layers": [1], "num_hidden_layers": 3}),
                                               ("mixtral", {})])
def test_stat_counts_equal_transformers_router_counts(family, overrides, tiny_model_dir, tmp_path):
    path = tiny_model_dir(family, **overrides)
    hf = _hf(path)
    with _engine(path, expert_distribution_dir=str(tmp_path)) as engine:
        layer_ids = list(engine.runner.model.routing_layers)
        _run(engine, _prompts(0, (7,)))  # before start: not recorded
        engine.start_expert_distribution_record()
        recorded = _run(engine, _prompts(1, (5, 23, 40)))
        engine.stop_expert_distribution_record()
        _run(engine, _prompts(2, (9,)))  # after stop: not recorded
        report = engine.dump_expert_distribution_record()
        assert Path(report["path"]).parent == tmp_path and report["path"].endswith(".safetensors")
        with safe_open(report["path"], "pt") as f:
            assert f.metadata()["mode"] == "stat"
        check_dump(report, _hf_counts(hf, recorded), sum(len(s) - 1 for s in recorded), layer_ids)
        # A dump starts afresh: the next one is empty.
        empty = engine.dump_expert_distribution_record()
        assert empty["summary"]["num_tokens"] == 0 and empty["summary"]["max_load_imbalance"] is None
        assert int(load_file(empty["path"])["counts"].sum()) == 0


def test_per_pass_and_per_token_modes(tiny_model_dir, tmp_path, monkeypatch):
    path = tiny_model_dir("qwen2_moe")
    hf = _hf(path)
    monkeypatch.setenv(DIR_ENV, str(tmp_path / "from-env"))
    prompts = _prompts(3, (6, 30, 17))
    for mode in ("per_pass", "per_token"):
        with _engine(path, expert_distribution_recorder_mode=mode) as engine:
            layer_ids = list(engine.runner.model.routing_layers)
            engine.start_expert_distribution_record()
            steps_before = engine.scheduler.forward_steps
            recorded = _run(engine, prompts)
            passes = engine.scheduler.forward_steps - steps_before
            report = engine.dump_expert_distribution_record()
        assert Path(report["path"]).parent == tmp_path / "from-env"
        want = _hf_counts(hf, recorded)
        tokens = sum(len(s) - 1 for s in recorded)
        tensors = check_dump(report, want, tokens, layer_ids)
        assert report["summary"]["num_forward_passes"] == passes
        if mode == "per_pass":
            per_pass = tensors["per_pass_counts"]
            assert per_pass.shape == (passes, len(layer_ids), 8)
            assert torch.equal(per_pass.sum(0).long(), want)
        else:
            ids = tensors["topk_ids"]
            assert ids.shape == (tokens, len(layer_ids), 2) and ids.dtype == torch.int16
            got = torch.stack([torch.bincount(ids[:, j].reshape(-1).long(), minlength=8)
                               for j in range(len(layer_ids))])
            assert torch.equal(got, want)


def test_buffer_size_keeps_the_newest(tiny_model_dir, tmp_path):
    path = tiny_model_dir("qwen3_moe")
    prompts = _prompts(4, (12, 20))
    for mode, size in (("per_pass", 3), ("per_token", 10)):
        with _engine(path, expert_distribution_recorder_mode=mode, expert_distribution_recorder_buffer_size=size,
                     expert_distribution_dir=str(tmp_path)) as engine:
            engine.start_expert_distribution_record()
            recorded = _run(engine, prompts)
            report = engine.dump_expert_distribution_record()
        tensors = load_file(report["path"])
        kept = tensors["per_pass_counts" if mode == "per_pass" else "topk_ids"]
        assert kept.shape[0] == size
        assert report["summary"]["num_tokens"] == sum(len(s) - 1 for s in recorded)  # the counts keep all
        if mode == "per_token":  # the newest tokens: the last decode steps' rows, in order
            assert kept.shape[1:] == (2, 2)


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="expert_distribution_recorder_mode must be stat, per_pass or per_token"):
        Engine(None, expert_distribution_recorder_mode="histogram", device="cpu")
