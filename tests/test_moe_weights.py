"""Hot weight updates of MoE models' expert weights: disk, tensors, and bucketed broadcasts.

Expert weights come under two sets of names: the per-expert names checkpoints use on disk
(`mlp.experts.{e}.gate_proj.weight`, Mixtral's `block_sparse_moe.experts.{e}.w1.weight`, ...) and the
stacked tensors a transformers (v5) trainer holds in memory (`mlp.experts.gate_up_proj`, ...). Each update
is checked against transformers on the new weights: greedy tokens equal its greedy continuation, and
get_weights_by_name equals the tensor sent. For per-expert tensors transformers' own loader converts them
(they are saved as a checkpoint and loaded back), so a wrong gate/up order or expert index shows up.
"""

from __future__ import annotations

import multiprocessing as mp
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from bucket_trainer import named_in_order, run
from tests.helpers import free_port
from runtime.engine import Engine
from sync import plan_buckets
from weight_trainer import perturbed, perturbed_transformers

pytestmark = pytest.mark.timeout(180)

PROMPT = [5, 17, 99, 42, 7, 200, 31, 64, 128, 3, 11, 12]
N = 8
BUCKET_BYTES = 40_000
FAMILIES = {"qwen3_moe": {"mlp_only_layers": [0], "num_hidden_layers": 3}, "qwen2_moe": {}, "mixtral": {}}
EXPERT_NAMES = {  # one expert's projection per family, as on disk
    "qwen3_moe": ["model.layers.1.mlp.experts.5.gate_proj.weight", "model.layers.2.mlp.experts.0.up_proj.weight",
                  "model.layers.2.mlp.experts.7.down_proj.weight", "model.layers.1.mlp.gate.weight"],
    "qwen2_moe": ["model.layers.0.mlp.experts.3.up_proj.weight", "model.layers.1.mlp.shared_expert.gate_proj.weight",
                  "model.layers.1.mlp.shared_expert_gate.weight"],
    "mixtral": ["model.layers.0.block_sparse_moe.experts.2.w1.weight",
                "model.layers.1.block_sparse_moe.experts.6.w3.weight",
                "model.layers.1.block_sparse_moe.experts.1.w2.weight", "model.layers.0.block_sparse_moe.gate.weight"],
}


def _greedy(eng: Engine) -> list[int]:
    return eng.generate(input_ids=PROMPT, sampling_params={"temperature": 0, "max_new_tokens": N,
                                                           "ignore_eos": True})["output_ids"]


@torch.no_grad()
def _hf_greedy(model: torch.nn.Module) -> list[int]:
    ids = torch.tensor([PROMPT])
    for _ in range(N):
        ids = torch.cat([ids, model(ids).logits[0, -1].argmax().view(1, 1)], dim=1)
    return ids[0, len(PROMPT):].tolist()


def _hf_on(ckpt: str, named: list[tuple[str, torch.Tensor]], tmp: Path) -> torch.nn.Module:
    """transformers' model on `named` over the checkpoint: by its loader for names as on disk, else by state dict."""
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    own = dict(model.named_parameters())
    if all(n in own for n, _ in named):
        model.load_state_dict(dict(named), strict=False)
        return model
    tmp.mkdir()
    shutil.copy(Path(ckpt) / "config.json", tmp / "config.json")
    save_file({n: t.contiguous() for n, t in named}, str(tmp / "model.safetensors"))
    return AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()


def _check_serves(eng: Engine, ckpt: str, named: list, tmp: Path, family: str) -> None:
    assert _greedy(eng) == _hf_greedy(_hf_on(ckpt, named, tmp))
    want = dict(named)
    stacked = [n for n in want if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    for name in EXPERT_NAMES[family] + stacked:
        if name in want:
            got = torch.tensor(eng.get_weights_by_name(name, truncate_size=3))
            assert torch.equal(got, want[name][:3]), name


@pytest.fixture(scope="module", params=list(FAMILIES))
def case(request, tiny_model_dir):
    family = request.param
    ckpts = {"a": tiny_model_dir(family, **FAMILIES[family]), "b": tiny_model_dir(family, seed=1, **FAMILIES[family])}
    eng = Engine(ckpts["a"], skip_tokenizer_init=True, max_total_tokens=1024, progress=False)
    yield family, ckpts, eng
    eng.shutdown()


def test_disk_switch_between_checkpoints(case, tiny_model_dir):
    family, ckpts, eng = case
    hf_a = AutoModelForCausalLM.from_pretrained(ckpts["a"], dtype=torch.float32).eval()
    hf_b = AutoModelForCausalLM.from_pretrained(ckpts["b"], dtype=torch.float32).eval()
    assert eng.update_weights_from_disk(ckpts["a"], weight_version="a")[0]
    a = _greedy(eng)
    assert a == _hf_greedy(hf_a)
    ok, msg = eng.update_weights_from_disk(ckpts["b"], weight_version="b")
    assert ok, msg
    b = _greedy(eng)
    assert b != a and b == _hf_greedy(hf_b)
    # Experts of another width: refused before any copy, naming an expert weight; b still serves.
    width = "intermediate_size" if family == "mixtral" else "moe_intermediate_size"
    wide = tiny_model_dir(family, **{**FAMILIES[family], width: 24})
    ok, msg = eng.update_weights_from_disk(wide)
    assert not ok and "Shape mismatch for model.layers." in msg and ".experts.0." in msg, msg
    assert _greedy(eng) == b and eng.weight_version == "b"


@pytest.mark.parametrize("source", ["checkpoint", "transformers"])
def test_tensor_update_of_experts(case, source, tmp_path):
    family, ckpts, eng = case
    named = (perturbed if source == "checkpoint" else perturbed_transformers)(ckpts["a"], 0.1, seed=3)
    assert any(".experts." in n for n, _ in named)
    ok, msg = eng.update_weights_from_tensor(named, weight_version=f"t-{source}")
    assert ok, msg
    _check_serves(eng, ckpts["a"], named, tmp_path / "ref", family)
    if source == "checkpoint":  # only some experts' tensors: the rest keep their values
        some = [(n, t) for n, t in perturbed(ckpts["a"], 0.3, seed=4) if ".experts.1." in n]
        assert some and eng.update_weights_from_tensor(some)[0]
        _check_serves(eng, ckpts["a"], list({**dict(named), **dict(some)}.items()), tmp_path / "some", family)
    # An expert index past the last one, or experts of a dense layer, are unknown weights; nothing changes.
    bad = [re.sub(r"\.experts\.\d+\.", ".experts.8.", EXPERT_NAMES[family][0])]
    if family == "qwen3_moe":
        bad.append("model.layers.0.mlp.experts.0.gate_proj.weight")
    before = _greedy(eng)
    for name in bad:
        ok, msg = eng.update_weights_from_tensor([(name, torch.zeros(3))])
        assert not ok and f"Unknown weight {name}" in msg
    assert _greedy(eng) == before
    assert eng.update_weights_from_disk(ckpts["a"])[0]


class _Trainer:
    """A trainer process (tests/bucket_trainer.py) joined to the engine on its own group."""

    def __init__(self, eng: Engine, ckpt: str, name: str):
        ctx = mp.get_context("spawn")
        self.eng, self.ckpt, self.name = eng, ckpt, name
        self.pushes, self.replies = ctx.Queue(), ctx.Queue()
        port = free_port()
        self.proc = ctx.Process(target=run, args=(port, name, ckpt, self.pushes, self.replies), daemon=True)
        self.proc.start()
        ok, msg = eng.init_weights_update_group("127.0.0.1", port, 1, 2, group_name=name, backend="gloo", timeout=30)
        assert ok, msg

    def push(self, source: str, order: list[str], load_format: str | None, scale: float, seed: int):
        """(the tensors sent, the path each request took in the engine's receiver)."""
        named = named_in_order(self.ckpt, scale, seed, order, source)
        self.pushes.put({"scale": scale, "seed": seed, "order": order, "load_format": load_format,
                         "bucket_bytes": BUCKET_BYTES, "die_after": None, "source": source})
        if load_format == "flattened_bucket":
            requests = [(m.names, m.dtypes, m.shapes)
                        for m in plan_buckets(((n, t.shape, t.dtype) for n, t in named), BUCKET_BYTES)]
        else:
            requests = [([n for n, _ in named], ["float32"] * len(named), [list(t.shape) for _, t in named])]
        receiver = self.eng.scheduler.controller.updater.receiver
        paths = []
        for names, dtypes, shapes in requests:
            receiver.last_path = ""
            ok, msg = self.eng.update_weights_from_distributed(names, dtypes, shapes, group_name=self.name,
                                                               load_format=load_format)
            assert ok, msg
            paths.append(receiver.last_path)
        assert self.replies.get(timeout=60) == "sent"
        return named, paths

    def close(self) -> None:
        self.pushes.put(None)
        self.proc.join(30)
        self.eng.destroy_weights_update_group(self.name)


@pytest.mark.parametrize("case", ["qwen3_moe", "mixtral"], indirect=True)  # Qwen2-MoE adds nothing here
def test_broadcast_of_experts(case, tmp_path):
    family, ckpts, eng = case
    disk_order = [n for n, _ in perturbed(ckpts["a"], 0.0, seed=0)]
    hf_order = [n for n, _ in perturbed_transformers(ckpts["a"], 0.0, seed=0)]
    trainer = _Trainer(eng, ckpts["a"], f"moe-{family}")
    try:
        # A transformers trainer's parameters in its own order: every bucket lands straight in the weights.
        named, paths = trainer.push("transformers", hf_order, "flattened_bucket", 0.1, seed=5)
        assert len(paths) > 4 and set(paths) == {"direct"}
        _check_serves(eng, ckpts["a"], named, tmp_path / "t", family)
        # Per-expert names as on disk (sorted, as a safetensors file lists them): received and copied.
        named, paths = trainer.push("checkpoint", disk_order, "flattened_bucket", 0.2, seed=6)
        assert "buffered" in paths
        _check_serves(eng, ckpts["a"], named, tmp_path / "c", family)
        # One broadcast per tensor, stacked experts each straight into their parameter.
        named, paths = trainer.push("transformers", hf_order, None, 0.3, seed=7)
        assert paths == ["direct"]
        _check_serves(eng, ckpts["a"], named, tmp_path / "p", family)
    finally:
        trainer.close()
    assert eng.update_weights_from_disk(ckpts["a"])[0]


def test_checkpoint_of_stacked_expert_tensors(case, tmp_path):
    """A checkpoint written from a transformers (v5) state dict names each layer's experts as two stacked
    tensors: it loads at startup and as a disk update, and one missing stacked tensor is refused."""
    family, ckpts, eng = case
    hf_b = AutoModelForCausalLM.from_pretrained(ckpts["b"], dtype=torch.float32).eval()
    state = {n: t.contiguous() for n, t in hf_b.state_dict().items()}
    assert any(n.endswith("mlp.experts.gate_up_proj") for n in state)
    stacked = tmp_path / "stacked"
    stacked.mkdir()
    shutil.copy(Path(ckpts["b"]) / "config.json", stacked / "config.json")
    save_file(state, str(stacked / "model.safetensors"))
    want = _hf_greedy(hf_b)
    with Engine(str(stacked), skip_tokenizer_init=True, max_total_tokens=256, progress=False) as fresh:
        assert _greedy(fresh) == want
    ok, msg = eng.update_weights_from_disk(str(stacked), weight_version="stacked")
    assert ok, msg
    assert _greedy(eng) == want
    lacking = tmp_path / "lacking"
    lacking.mkdir()
    shutil.copy(Path(ckpts["b"]) / "config.json", lacking / "config.json")
    dropped = next(n for n in state if n.endswith("experts.down_proj"))
    save_file({n: t for n, t in state.items() if n != dropped}, str(lacking / "model.safetensors"))
    ok, msg = eng.update_weights_from_disk(str(lacking))
    layer = dropped.split(".")[2]
    assert not ok and "lacks 8 weights" in msg and f"model.layers.{layer}." in msg and ".experts.0." in msg, msg
    assert eng.weight_version == "stacked" and _greedy(eng) == want
    assert eng.update_weights_from_disk(ckpts["a"])[0]
