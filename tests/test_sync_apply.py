"""Applying HF-named tensors to a running model: in place, all or nothing; and updates from disk.

The oracle for "the update landed right" is a fresh model built from the checkpoint the update came
from: every parameter and the logits must be bitwise equal. The oracle for "a failed update left the
model untouched" is the checksum of every weight before and after.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from runtime.forward_batch import ForwardBatch
from runtime.model_runner import ModelRunner
from runtime.server_args import ServerArgs
from sync import (CheckpointNotFoundError, PartialUpdateError, WeightUpdateError, apply_named_tensors, check_specs,
                  checkpoint_specs, digest_of, iterate_checkpoint, model_checksums, update_weights_from_disk,
                  validate_checkpoint)
from sync.specs import TensorSpecs


def _runner(path: str) -> ModelRunner:
    return ModelRunner(ServerArgs(model_path=path, max_total_tokens=512, device="cpu", dtype="float32"), progress=False)


def _prefill_logits(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    n = len(ids)
    slots = torch.arange(n)
    return runner.forward(ForwardBatch(
        input_ids=torch.tensor(ids), positions=torch.arange(n), out_slots=slots,
        prefix_lens=torch.tensor([0]), extend_lens=torch.tensor([n]), seq_lens=torch.tensor([n]),
        page_table=slots[None], num_extend=1, logits_indices=torch.arange(n)))


def _data_ptrs(model: torch.nn.Module) -> dict[str, int]:
    return {n: p.data_ptr() for n, p in model.named_parameters()}


def _perturbed(model: torch.nn.Module, seed: int = 1) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for name in model.hf_weight_names():
        target = model.weight_target(name)
        out.append((name, target + 0.01 * torch.randn(target.shape, generator=gen)))
    return out


IDS = [5, 17, 42, 99, 3, 250, 7, 64]


@pytest.fixture()
def base_path(tiny_model_dir) -> str:
    return tiny_model_dir("llama")


@pytest.fixture()
def other_path(tiny_model_dir) -> str:
    return tiny_model_dir("llama", seed=1)


@pytest.fixture()
def model(base_path):
    return _runner(base_path).model


# --- apply_named_tensors ---------------------------------------------------------------------------


def test_update_equals_fresh_model_from_that_checkpoint(base_path, other_path) -> None:
    runner, fresh = _runner(base_path), _runner(other_path)
    ptrs = _data_ptrs(runner.model)
    before = _prefill_logits(runner, IDS)
    assert not torch.equal(before, _prefill_logits(fresh, IDS))

    report = apply_named_tensors(runner.model, iterate_checkpoint(other_path))

    assert sorted(report.names) == sorted(runner.model.hf_weight_names())
    assert report.num_bytes == sum(p.nbytes for p in runner.model.parameters())
    assert report.digest == digest_of(iterate_checkpoint(other_path))
    for (name, p), (_, q) in zip(runner.model.named_parameters(), fresh.model.named_parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(_prefill_logits(runner, IDS), _prefill_logits(fresh, IDS))
    assert _data_ptrs(runner.model) == ptrs


def test_hf_names_land_in_fused_parameters(model) -> None:
    named = dict(_perturbed(model))
    apply_named_tensors(model, named.items())
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    q, kv = attn.q_size, attn.kv_size
    qkv = attn.qkv_proj.weight
    assert torch.equal(qkv[:q], named["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(qkv[q:q + kv], named["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(qkv[q + kv:], named["model.layers.1.self_attn.v_proj.weight"])
    inter = mlp.intermediate_size
    assert torch.equal(mlp.gate_up_proj.weight[:inter], named["model.layers.1.mlp.gate_proj.weight"])
    assert torch.equal(mlp.gate_up_proj.weight[inter:], named["model.layers.1.mlp.up_proj.weight"])
    for name, tensor in named.items():
        assert torch.equal(model.weight_target(name), tensor), name


def test_casts_bf16_and_a_subset_updates_only_its_tensors(model) -> None:
    before = model_checksums(model)
    name = "model.layers.0.mlp.down_proj.weight"
    new = torch.randn(model.weight_target(name).shape).bfloat16()
    report = apply_named_tensors(model, [(name, new)])
    assert report.names == [name]
    assert torch.equal(model.weight_target(name), new.float())
    after = model_checksums(model)
    assert [n for n in before if before[n] != after[n]] == [name]


def _bad_cases(model) -> dict[str, tuple[str, torch.Tensor, list[str]]]:
    q = "model.layers.1.self_attn.q_proj.weight"
    shape = tuple(model.weight_target(q).shape)
    return {
        "wrong shape": (q, torch.zeros(shape[0], shape[1] + 1), [q, str(shape), str((shape[0], shape[1] + 1))]),
        "unknown name": ("model.layers.9.mlp.gate_proj.weight", torch.zeros(3),
                         ["model.layers.9.mlp.gate_proj.weight", "Unknown"]),
        "integer dtype": (q, torch.zeros(shape, dtype=torch.int64), [q, "torch.int64", "float32"]),
        "bool dtype": (q, torch.zeros(shape, dtype=torch.bool), [q, "torch.bool"]),
        "duplicate": ("model.embed_tokens.weight", model.weight_target("model.embed_tokens.weight") + 1,
                      ["model.embed_tokens.weight", "twice"]),
        "not a tensor": (q, [[0.0]], [q, "list"]),
    }


@pytest.mark.parametrize("case", ["wrong shape", "unknown name", "integer dtype", "bool dtype", "duplicate",
                                  "not a tensor"])
def test_bad_tensor_is_refused_and_nothing_changes(model, case) -> None:
    before, ptrs = model_checksums(model), _data_ptrs(model)
    name, bad, expected_words = _bad_cases(model)[case]
    # Good tensors first, so a copy-as-you-go implementation would already have written them.
    stream = [(n, t) for n, t in _perturbed(model) if n != name or case == "duplicate"] + [(name, bad)]
    with pytest.raises(WeightUpdateError) as err:
        apply_named_tensors(model, stream)
    for word in expected_words:
        assert word in str(err.value), (word, str(err.value))
    assert model_checksums(model) == before
    assert _data_ptrs(model) == ptrs


def test_check_specs_refuses_before_any_data(model) -> None:
    good = TensorSpecs.of(_perturbed(model))
    assert all(t is not None for t in check_specs(model, good))
    bad = TensorSpecs(good.names[:1], ["int32"], good.shapes[:1])
    with pytest.raises(WeightUpdateError, match="model.embed_tokens.weight"):
        check_specs(model, bad)
    with pytest.raises(WeightUpdateError, match="notatype"):
        check_specs(model, TensorSpecs(good.names[:1], ["notatype"], good.shapes[:1]))


def test_tied_lm_head_is_skipped(tiny_model_dir) -> None:
    model = _runner(tiny_model_dir("llama", tie_word_embeddings=True)).model
    embed = model.weight_target("model.embed_tokens.weight")
    report = apply_named_tensors(model, [("model.embed_tokens.weight", embed + 1), ("lm_head.weight", embed * 0),
                                         ("model.rotary_emb.inv_freq", torch.zeros(8))])
    assert report.names == ["model.embed_tokens.weight"]
    assert report.skipped == ["lm_head.weight", "model.rotary_emb.inv_freq"]
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_source_that_requires_grad_is_copied_without_autograd(model) -> None:
    name = "model.norm.weight"
    src = torch.ones(model.weight_target(name).shape, requires_grad=True) * 2
    apply_named_tensors(model, [(name, src)])
    assert torch.equal(model.weight_target(name), src.detach())
    assert not model.weight_target(name).requires_grad


# --- disk ------------------------------------------------------------------------------------------


def test_missing_path_message(model, tmp_path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(CheckpointNotFoundError) as err:
        update_weights_from_disk(model, missing)
    assert str(err.value) == f"Failed to get weights iterator: {missing} (repository not found)."
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, WeightUpdateError)
    with pytest.raises(CheckpointNotFoundError, match="no \\*.safetensors"):
        update_weights_from_disk(model, str(tmp_path))


def test_disk_switch_and_back(base_path, other_path) -> None:
    runner, fresh = _runner(base_path), _runner(other_path)
    original, ptrs = model_checksums(runner.model), _data_ptrs(runner.model)
    report = update_weights_from_disk(runner.model, other_path)
    assert model_checksums(runner.model) == model_checksums(fresh.model)
    assert report.digest == digest_of(iterate_checkpoint(other_path))
    assert torch.equal(_prefill_logits(runner, IDS), _prefill_logits(fresh, IDS))
    update_weights_from_disk(runner.model, base_path)
    assert model_checksums(runner.model) == original
    assert _data_ptrs(runner.model) == ptrs


def _sharded_copy(src: str, dst: Path, edit) -> str:
    """Two-file copy of a checkpoint; edit(name, tensor) returns the tensor to write or None to drop it."""
    tensors = {}
    for name, tensor in iterate_checkpoint(src):
        new = edit(name, tensor)
        if new is not None:
            tensors[name] = new.contiguous()
    names = list(tensors)
    dst.mkdir()
    save_file({n: tensors[n] for n in names[: len(names) // 2]}, str(dst / "model-00001-of-00002.safetensors"))
    save_file({n: tensors[n] for n in names[len(names) // 2:]}, str(dst / "model-00002-of-00002.safetensors"))
    return str(dst)


def test_disk_shape_mismatch_refused_before_any_copy(model, other_path, tmp_path) -> None:
    bad_name = "model.layers.1.mlp.down_proj.weight"  # in the second file: the first would be copied first
    path = _sharded_copy(other_path, tmp_path / "bad",
                         lambda n, t: t[:, :-1] if n == bad_name else t)
    assert bad_name in checkpoint_specs(path).names[len(checkpoint_specs(path).names) // 2:]
    before = model_checksums(model)
    with pytest.raises(WeightUpdateError) as err:
        update_weights_from_disk(model, path)
    shape = tuple(model.weight_target(bad_name).shape)
    assert bad_name in str(err.value) and str(shape) in str(err.value)
    assert str((shape[0], shape[1] - 1)) in str(err.value)
    assert model_checksums(model) == before


def test_disk_missing_tensor_refused_and_unknown_skipped(model, other_path, tmp_path) -> None:
    before = model_checksums(model)
    gone = "model.layers.0.post_attention_layernorm.weight"
    path = _sharded_copy(other_path, tmp_path / "missing", lambda n, t: None if n == gone else t)
    with pytest.raises(WeightUpdateError, match=gone):
        update_weights_from_disk(model, path)
    assert model_checksums(model) == before

    extra = _sharded_copy(other_path, tmp_path / "extra", lambda n, t: t)
    save_file({"model.vision_tower.weight": torch.zeros(2)}, str(Path(extra) / "z-extra.safetensors"))
    assert "model.vision_tower.weight" not in validate_checkpoint(model, extra)
    with pytest.raises(WeightUpdateError, match="vision_tower"):
        validate_checkpoint(model, extra, allow_unknown=False)
    update_weights_from_disk(model, extra)
    assert model_checksums(model) == model_checksums(_runner(other_path).model)


def test_disk_file_changed_midway(model, other_path, tmp_path) -> None:
    """The second file of a sharded checkpoint changes after the first was copied: a mix, reported as one
    (the first file alone changing is refused with nothing copied: tests/test_disk_reads.py)."""
    import sync.checkpoint_file

    path = _sharded_copy(other_path, tmp_path / "sharded", lambda n, t: t)
    files = sorted(Path(path).glob("*.safetensors"))
    assert len(files) > 1
    real = sync.checkpoint_file.CheckpointFile.read_tensors
    calls = []

    def rewrite_second(self, names=None, scratch=None):
        calls.append(self.path)
        if len(calls) == 2:  # a trainer re-saving it in place, after its header was read
            time.sleep(0.02)  # past the file system's timestamp granularity
            data = self.path.read_bytes()
            self.path.write_bytes(b"")
            self.path.write_bytes(data)
        return real(self, names, scratch)

    sync.checkpoint_file.CheckpointFile.read_tensors = rewrite_second
    try:
        with pytest.raises(PartialUpdateError, match="changed while being read"):
            update_weights_from_disk(model, path)
    finally:
        sync.checkpoint_file.CheckpointFile.read_tensors = real
