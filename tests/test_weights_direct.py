"""Broadcast updates received straight into the weights (receive mode "direct") or buffered, in-process.

A trainer process (tests/bucket_trainer.py) broadcasts seeded perturbations over gloo to an Engine. Oracles:
get_weights_by_name equals the trainer's tensors and greedy output equals transformers' on them; which path
each request took (the receiver's `last_path`): buckets in the checkpoint's parameter order go direct, an
order the flat layout does not match falls back to the buffer; and a trainer killed mid-broadcast leaves a
direct-mode engine refusing to generate (a mix, until the next good update) and a buffered one serving its
old weights.
"""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.bucket_trainer import named_in_order, run
from tests.helpers import free_port
from runtime.engine import Engine, WeightsUnusableError
from sync import plan_buckets
from tests.weight_trainer import hf_greedy

pytestmark = pytest.mark.timeout(180)

PROMPT = [5, 17, 99, 42, 7, 200, 31, 64, 128, 3, 11, 12]
N = 8
BUCKET_BYTES = 40_000
CHECK = ("model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.up_proj.weight",
         "model.norm.weight", "lm_head.weight")


class Link:
    """An Engine joined to one trainer process on its own group."""

    def __init__(self, eng: Engine, ckpt: str, name: str, backend: str = "gloo", announce: str | None = "same"):
        """`announce`: the backend the engine is asked to join with ("same": `backend`; None: its default)."""
        ctx = mp.get_context("spawn")
        self.eng, self.ckpt, self.name = eng, ckpt, name
        self.pushes, self.replies = ctx.Queue(), ctx.Queue()
        port = free_port()
        self.proc = ctx.Process(target=run, args=(port, name, ckpt, self.pushes, self.replies, backend), daemon=True)
        self.proc.start()
        ok, msg = eng.init_weights_update_group("127.0.0.1", port, 1, 2, group_name=name, timeout=30,
                                                backend=backend if announce == "same" else announce)
        assert ok, msg

    def push(self, order: list[str], load_format: str | None, scale: float, seed: int,
             die_after: int | None = None) -> tuple[list, list[tuple[bool, str]], list[str]]:
        """(the tensors sent, each request's answer, the path each request took)."""
        named = named_in_order(self.ckpt, scale, seed, order)
        self.pushes.put({"scale": scale, "seed": seed, "order": order, "load_format": load_format,
                         "bucket_bytes": BUCKET_BYTES, "die_after": die_after})
        if load_format == "flattened_bucket":
            requests = [(m.names, m.dtypes, m.shapes)
                        for m in plan_buckets(((n, t.shape, t.dtype) for n, t in named), BUCKET_BYTES)]
        else:
            requests = [([n for n, _ in named], ["float32"] * len(named), [list(t.shape) for _, t in named])]
        answers, paths = [], []
        receiver = self.eng.scheduler.controller.updater.receiver
        for names, dtypes, shapes in requests:
            receiver.last_path = ""
            answers.append(self.eng.update_weights_from_distributed(names, dtypes, shapes, group_name=self.name,
                                                                    load_format=load_format))
            paths.append(receiver.last_path)
            if not answers[-1][0]:
                break
        if die_after is None:
            assert self.replies.get(timeout=60) == "sent"
        return named, answers, paths

    def close(self) -> None:
        if self.proc.is_alive():
            self.pushes.put(None)
            self.proc.join(30)
        self.eng.destroy_weights_update_group(self.name)


@pytest.fixture(scope="module")
def ckpt(tiny_model_dir) -> str:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def hf_order(ckpt) -> list[str]:
    """The order a trainer's transformers model yields its parameters in."""
    return [n for n, _ in AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).named_parameters()]


def _engine(ckpt: str, mode: str, device: str = "cpu") -> Engine:
    return Engine(ckpt, skip_tokenizer_init=True, max_total_tokens=2048, progress=False, weight_update_receive=mode,
                  device=device, dtype="float32")


# The broadcast backend and the server's device: the same code path for both. NCCL refuses two ranks on
# one GPU, so the trainer and the engine need a device each.
BACKENDS = [
    pytest.param("gloo", "cpu", id="gloo-cpu"),
    pytest.param("nccl", "cuda", id="nccl-cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        torch.cuda.device_count() < 2, reason="NCCL between a trainer and a server needs two CUDA devices "
                                              "(NCCL refuses two ranks on one GPU)")]),
]


def _greedy(eng: Engine) -> list[int]:
    return eng.generate(input_ids=PROMPT, sampling_params={"temperature": 0, "max_new_tokens": N,
                                                           "ignore_eos": True})["output_ids"]


def _check_serves(eng: Engine, named: list, ckpt: str) -> None:
    want = dict(named)
    for name in CHECK:
        assert torch.equal(torch.tensor(eng.get_weights_by_name(name, truncate_size=3)), want[name][:3]), name
    assert _greedy(eng) == hf_greedy(ckpt, PROMPT, N, named)


@pytest.fixture(scope="module")
def direct(ckpt):
    eng = _engine(ckpt, "direct")
    yield eng
    eng.shutdown()


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_direct_buckets_in_checkpoint_order(backend, device, direct, ckpt, hf_order):
    # The trainer sends from cuda:0 (its default device); the engine receives on cuda:1.
    eng = direct if device == "cpu" else _engine(ckpt, "direct", "cuda:1")
    link = Link(eng, ckpt, f"direct-ok-{backend}", backend)
    try:
        named, answers, paths = link.push(hf_order, "flattened_bucket", 0.1, seed=3)
        assert all(ok for ok, _ in answers), answers
        assert len(paths) > 4 and set(paths) == {"direct"}
        _check_serves(eng, named, ckpt)
        # An order the layout does not match (sorted names, as a safetensors file lists them): the buckets
        # that do not map are buffered and copied, the rest still go direct; the result is the same.
        named, answers, paths = link.push(sorted(hf_order), "flattened_bucket", 0.2, seed=4)
        assert all(ok for ok, _ in answers), answers
        assert "buffered" in paths and "direct" in paths
        _check_serves(eng, named, ckpt)
        # One broadcast per tensor, each into its parameter.
        named, answers, paths = link.push(hf_order, None, 0.3, seed=5)
        assert answers == [(True, "Succeeded to update parameter online.")] and paths == ["direct"]
        _check_serves(eng, named, ckpt)
        # A refused request (unknown name) is still drained, writes nothing, and the group stays usable.
        before = _greedy(eng)
        link.pushes.put({"scale": 0.0, "seed": 0, "order": hf_order[:1], "load_format": None,
                         "bucket_bytes": BUCKET_BYTES, "die_after": None})
        ok, msg = eng.update_weights_from_distributed(["model.nope.weight"], ["float32"], [[256, 64]],
                                                      group_name=link.name)
        assert not ok and "Unknown weight model.nope.weight" in msg and "Rolling back" in msg
        assert link.replies.get(timeout=60) == "sent" and _greedy(eng) == before
    finally:
        link.close()
        if eng is not direct:
            eng.shutdown()


def test_group_backend_defaults_by_device(direct, ckpt, hf_order):
    """No backend named: a CPU server joins with gloo (a CUDA one would take NCCL); NCCL on CPU is refused."""
    link = Link(direct, ckpt, "by-device", "gloo", announce=None)
    try:
        assert direct.scheduler.controller.updater.groups["by-device"].backend == "gloo"
        named, answers, _ = link.push(hf_order, "flattened_bucket", 0.1, seed=8)
        assert all(ok for ok, _ in answers), answers
        _check_serves(direct, named, ckpt)
    finally:
        link.close()
    ok, msg = direct.init_weights_update_group("127.0.0.1", free_port(), 1, 2, group_name="nccl-on-cpu",
                                               backend="nccl", timeout=2)
    assert not ok and "backend='nccl' needs a CUDA device" in msg, msg


@pytest.mark.parametrize("mode", ["direct", "buffered"])
@pytest.mark.parametrize("load_format, die_after", [("flattened_bucket", 0), (None, 3)])
def test_trainer_killed_mid_broadcast(mode, load_format, die_after, direct, ckpt, hf_order):
    eng = direct if mode == "direct" else _engine(ckpt, "buffered")
    try:
        assert eng.update_weights_from_disk(ckpt, weight_version="before")[0]
        before = _greedy(eng)
        link = Link(eng, ckpt, f"dying-{mode}-{load_format}")
        try:
            _, answers, paths = link.push(hf_order, load_format, 0.5, seed=6, die_after=die_after)
        finally:
            link.close()
        ok, msg = answers[-1]
        assert not ok and "failed" in msg
        if mode == "direct":  # the first request was being received into the weights: a mix
            assert "mix of old and new" in msg and "direct receive" in msg
            with pytest.raises(WeightsUnusableError, match="mix of old and new"):
                _greedy(eng)
            assert eng.update_weights_from_disk(ckpt, weight_version="after")[0]
        else:  # nothing was copied: the old weights serve
            assert "Rolling back to original weights" in msg and paths == [""]
        assert _greedy(eng) == before
    finally:
        if eng is not direct:
            eng.shutdown()
