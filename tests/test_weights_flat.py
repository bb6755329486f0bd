"""The flat parameter layout (sync.flat_parameters) and which buckets it lets a broadcast land in directly.

Oracles: a runner built without the relayout (separate parameter storages) gives bitwise the same logits
as one with it, for every family and tied/untied embeddings; and buckets planned in transformers' own
`named_parameters()` order, as a trainer sends them, map onto one byte range of the flat storage
(sync.direct_target), except the ones the layout cannot match (Qwen2's interleaved q/k/v biases).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from runtime.forward_batch import ForwardBatch
from runtime.model_runner import ModelRunner
from runtime.server_args import ServerArgs
from sync import check_specs, plan_buckets
from sync.bucket import layout_bucket
from sync.direct_target import bucket_view, tensor_view
from sync.specs import TensorSpecs

CASES = {"llama-untied": ("llama", {}), "llama-tied": ("llama", {"tie_word_embeddings": True}),
         "llama-bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
         "qwen2": ("qwen2", {}), "qwen3": ("qwen3", {}), "qwen3-tied": ("qwen3", {"tie_word_embeddings": True}),
         # MoE: a transformers trainer sends each layer's experts as two stacked tensors (mlp.experts.gate_up_proj,
         # mlp.experts.down_proj), which are our parameters as they are.
         "qwen3-moe": ("qwen3_moe", {"mlp_only_layers": [0]}), "qwen2-moe": ("qwen2_moe", {}),
         "mixtral": ("mixtral", {})}
FUSED_BIASES = tuple(f"{p}_proj.bias" for p in ("q", "k", "v", "gate", "up"))
IDS = [5, 17, 42, 99, 3, 250, 7, 64, 1, 2]


def _runner(path: str) -> ModelRunner:
    return ModelRunner(ServerArgs(model_path=path, max_total_tokens=256, device="cpu"), progress=False)


def _logits(runner: ModelRunner) -> torch.Tensor:
    n = len(IDS)
    slots = torch.arange(n)
    return runner.forward(ForwardBatch(
        input_ids=torch.tensor(IDS), positions=torch.arange(n), out_slots=slots, prefix_lens=torch.tensor([0]),
        extend_lens=torch.tensor([n]), seq_lens=torch.tensor([n]), page_table=slots[None], num_extend=1,
        logits_indices=torch.arange(n)))


def _storages(model: torch.nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


@pytest.mark.parametrize("case", list(CASES))
def test_relayout_keeps_logits_and_ties(case, tiny_model_dir, monkeypatch):
    family, overrides = CASES[case]
    path = tiny_model_dir(family, **overrides)
    flat = _runner(path)
    assert len(_storages(flat.model)) == 1 and len(flat.flat_weights) == 1
    assert flat.flat_weights[0].nbytes == sum(p.nbytes for p in flat.model.parameters())  # no gaps here
    monkeypatch.setattr("runtime.model_runner.flatten_parameters", lambda model: [])
    separate = _runner(path)
    assert len(_storages(separate.model)) == len(list(separate.model.parameters())) > 1
    assert torch.equal(_logits(flat), _logits(separate))
    for (name, a), (_, b) in zip(flat.model.named_parameters(), separate.model.named_parameters()):
        assert torch.equal(a, b), name
    m = flat.model
    assert (m.lm_head.weight is m.model.embed_tokens.weight) == overrides.get("tie_word_embeddings", False)


def _trainer_buckets(path: str, bucket_bytes: int) -> list:
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return plan_buckets(((n, p.shape, p.dtype) for n, p in hf.named_parameters()), bucket_bytes)


def _maps(model: torch.nn.Module, meta) -> bool:
    specs = TensorSpecs(meta.names, meta.dtypes, meta.shapes)
    return bucket_view(check_specs(model, specs), layout_bucket(specs), "cpu") is not None


@pytest.mark.parametrize("case", list(CASES))
def test_trainer_order_buckets_map_to_the_flat_storage(case, tiny_model_dir):
    family, overrides = CASES[case]
    path = tiny_model_dir(family, **overrides)
    model = _runner(path).model
    flat = model.model.embed_tokens.weight.untyped_storage()
    whole = _trainer_buckets(path, 1 << 30)
    assert len(whole) == 1
    buckets = _trainer_buckets(path, 40_000)
    assert len(buckets) > 4
    if any(n.endswith("_proj.bias") for meta in buckets for n in meta.names):
        # HF interleaves q.weight, q.bias, k.weight, ...; our fused q/k/v (gate/up) bias is one tensor after
        # the fused weight, so only buckets holding such a bias take the buffered path.
        for meta in buckets:
            assert _maps(model, meta) == (not any(n.endswith(FUSED_BIASES) for n in meta.names)), meta.names
        assert any(_maps(model, meta) for meta in buckets)
        assert not _maps(model, whole[0])
        return
    assert all(_maps(model, meta) for meta in buckets)
    # The whole model as one bucket is the whole flat storage.
    view = bucket_view(check_specs(model, whole[0].specs()), whole[0], "cpu")
    assert view.nbytes == flat.nbytes() and view.data_ptr() == flat.data_ptr()


def test_buckets_that_do_not_map(tiny_model_dir):
    model = _runner(tiny_model_dir("llama")).model
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"]
    ok = TensorSpecs(names, ["float32"] * 2, [[64, 64], [32, 64]])
    assert _maps(model, layout_bucket(ok))
    swapped = TensorSpecs(names[::-1], ["float32"] * 2, [[32, 64], [64, 64]])
    assert not _maps(model, layout_bucket(swapped))  # out of order
    gap = TensorSpecs([names[0], "model.layers.0.self_attn.v_proj.weight"], ["float32"] * 2, [[64, 64], [32, 64]])
    assert not _maps(model, layout_bucket(gap))  # k is missing in between
    cast = TensorSpecs(names, ["bfloat16"] * 2, [[64, 64], [32, 64]])
    assert not _maps(model, layout_bucket(cast))  # needs a conversion
    # A mixed-dtype bucket pads each tensor to 16 bytes: its layout is not the model's.
    norm = "model.layers.0.input_layernorm.weight"
    mixed = TensorSpecs(["model.layers.0.mlp.down_proj.weight", norm], ["float32", "bfloat16"], [[64, 128], [64]])
    assert not _maps(model, layout_bucket(mixed))
    q = model.weight_target(names[0])
    assert tensor_view(q, torch.float32, "cpu") is q
    assert tensor_view(q, torch.bfloat16, "cpu") is None
    assert tensor_view(q.t(), torch.float32, "cpu") is None
