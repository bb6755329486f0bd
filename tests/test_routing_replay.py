"""Which experts MoE layers route to: the engine's record of it (RoutingCapture) and the trainer's replay of it.

Oracles are transformers' own routers on the same weights:
- the capture of a prefill and of paged decode steps equals the top-k of transformers' router logits,
  layer by layer (dense layers record nothing);
- `sync.routing_replay.replay_routing` replaying a model's own choices changes nothing, bit for bit;
- the RL case: a trainer whose router weights differ slightly from the rollout engine's chooses other
  experts on some tokens; replaying the rollout's choices makes its logprobs those of the rollout.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from runtime.engine import Engine
from runtime.forward_batch import ForwardBatch
from runtime.model_runner import ModelRunner
from runtime.routing_capture import RoutingCapture
from runtime.server_args import ServerArgs
from sync.routing_replay import moe_routers, replay_routing

FAMILIES = {
    "qwen3-moe": ("qwen3_moe", {"mlp_only_layers": [1], "num_hidden_layers": 3}),
    "qwen3-moe-norm": ("qwen3_moe", {"norm_topk_prob": True}),
    "qwen2-moe": ("qwen2_moe", {}),
    "mixtral": ("mixtral", {}),
}


def _hf(path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def _hf_routing(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """[len(ids), num MoE layers, k]: the top-k of transformers' router logits (top-k of the softmax, as it routes)."""
    out = model(torch.tensor([ids]), output_router_logits=True)
    k = next(iter(moe_routers(model).values())).top_k
    return torch.stack([logits.topk(k, dim=-1).indices for logits in out.router_logits], dim=1)


def _step(runner: ModelRunner, ids: list[int], start: int, slots: torch.Tensor) -> RoutingCapture:
    """One request's tokens [start:] on top of its first `start` tokens in KV, recording the routing."""
    n = len(ids)
    capture = RoutingCapture()
    runner.forward(ForwardBatch(
        input_ids=torch.tensor(ids[start:]), positions=torch.arange(start, n), out_slots=slots[start:n],
        prefix_lens=torch.tensor([start]), extend_lens=torch.tensor([n - start]), seq_lens=torch.tensor([n]),
        page_table=slots[None, :n], num_extend=1 if n - start > 1 else 0,
        logits_indices=torch.tensor([n - start - 1]), routing=capture))
    return capture


@pytest.mark.parametrize("variant", list(FAMILIES))
def test_capture_matches_transformers_routers(variant, tiny_model_dir):
    family, overrides = FAMILIES[variant]
    path = tiny_model_dir(family, **overrides)
    runner = ModelRunner(ServerArgs(model_path=path, max_total_tokens=256, device="cpu"), progress=False)
    hf = _hf(path)
    ids = torch.randint(0, 256, (30,), generator=torch.Generator().manual_seed(0)).tolist()
    want = _hf_routing(hf, ids)
    slots = torch.randperm(256, generator=torch.Generator().manual_seed(1))[:30]
    prefill = _step(runner, ids[:24], 0, slots)
    assert prefill.layer_ids == runner.model.routing_layers == sorted(moe_routers(hf))
    assert torch.equal(prefill.stacked(), want[:24])
    for n in range(25, 31):  # paged decode, one token at a time
        assert torch.equal(_step(runner, ids[:n], n - 1, slots).stacked(), want[n - 1:n])


@pytest.mark.parametrize("variant", list(FAMILIES))
def test_replaying_own_routing_changes_nothing(variant, tiny_model_dir):
    family, overrides = FAMILIES[variant]
    hf = _hf(tiny_model_dir(family, **overrides))
    batch = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        natural = hf(batch).logits
        routing = torch.stack([_hf_routing(hf, row.tolist()) for row in batch])  # [2, 12, layers, k]
        with replay_routing(hf, routing):
            replayed = hf(batch).logits
        other = (routing + 1) % 8  # every choice moved: another computation
        with replay_routing(hf, other):
            moved = hf(batch).logits
        after = hf(batch).logits  # the context removed its hooks
    assert torch.equal(replayed, natural) and torch.equal(after, natural)
    assert not torch.allclose(moved, natural, atol=1e-3)


def test_replay_refuses_what_does_not_fit(tiny_model_dir):
    hf = _hf(tiny_model_dir("qwen3_moe"))
    ids = torch.zeros(1, 5, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="3 layers x top 2; the model has 2 MoE layers"):
        with replay_routing(hf, torch.zeros(1, 5, 3, 2, dtype=torch.long)):
            pass
    with pytest.raises(ValueError, match=r"outside \[0, 8\)"):
        with replay_routing(hf, ids + 8):
            pass
    with pytest.raises(ValueError, match=r"\(5, 2\) expert ids given, but the router sees 6 tokens"), torch.no_grad():
        with replay_routing(hf, ids):
            hf(torch.zeros(1, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="has no MoE router"):
        with replay_routing(_hf(tiny_model_dir("qwen3")), ids):
            pass


# ------------------------------------------------------------------------------------------------
# The RL case: rollout on the engine, logprobs recomputed by a trainer whose routers differ slightly
# ------------------------------------------------------------------------------------------------

TIE = 3e-5            # half the router-row difference between the tied experts of a pair (engine +, trainer -)
EXPERT_SCALE = 0.01   # experts' down projections scaled down: see _tied_pair_models
PAIRS = ((0, 1), (2, 3))


def _tied_pair_models(path: str, out_dir: str) -> torch.nn.Module:
    """Save the rollout's model to out_dir and return the trainer's.

    Flips in practice happen where two experts' router logits nearly tie. Here experts 0/1 and 2/3 have router
    rows W[a] and W[a] + TIE * r: their logits differ by TIE * (r . h), which the trainer's rows W[a] - TIE * r
    reverse, so on every token where such a pair straddles the top-k boundary the two choose differently.
    Replaying still leaves the routing weights to the trainer's own logits, off by about TIE; the experts'
    small outputs (EXPERT_SCALE) keep that well under the 1e-5 checked, while a flipped expert still moves the
    logprobs by about 1e-2. TIE stays far above fp32 noise in the logits (~1e-7), so the engine's chunked
    prefill and decode choose as its one-pass prefill does.
    """
    rollout, trainer = _hf(path), _hf(path)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for model in (rollout, trainer):
            for name, p in model.named_parameters():
                if name.endswith("experts.down_proj"):
                    p.mul_(EXPERT_SCALE)
        for (layer, r), t in zip(moe_routers(rollout).items(), moe_routers(trainer).values()):
            for a, b in PAIRS:
                direction = torch.randn(r.weight.shape[1], generator=gen)
                direction /= direction.norm()
                r.weight[b] = r.weight[a] + TIE * direction
                t.weight[b] = r.weight[a] - TIE * direction
    rollout.save_pretrained(out_dir)
    return trainer


def _rollout_routing(runner: ModelRunner, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """([len(ids), layers, k] expert ids, [len(ids) - 1] logprob of each next token) from one engine forward pass.

    Phase 1 stand-in for the ids /generate will return: the engine's model over the finished sequence.
    """
    n = len(ids)
    slots = torch.arange(n)
    capture = RoutingCapture()
    logits = runner.forward(ForwardBatch(
        input_ids=torch.tensor(ids), positions=torch.arange(n), out_slots=slots, prefix_lens=torch.tensor([0]),
        extend_lens=torch.tensor([n]), seq_lens=torch.tensor([n]), page_table=slots[None], num_extend=1,
        logits_indices=torch.arange(n), routing=capture))
    lp = torch.log_softmax(logits, dim=-1)[torch.arange(n - 1), torch.tensor(ids[1:])]
    return capture.stacked(), lp


def _token_logprobs(logits: torch.Tensor, ids: list[int], start: int) -> torch.Tensor:
    lp = torch.log_softmax(logits.float(), dim=-1)
    return lp[torch.arange(start - 1, len(ids) - 1), torch.tensor(ids[start:])]


@pytest.mark.parametrize("variant", ["qwen3-moe-norm", "qwen2-moe", "mixtral"])
def test_replay_gives_trainer_the_rollout_logprobs(variant, tiny_model_dir, tmp_path):
    family, overrides = FAMILIES[variant]
    trainer = _tied_pair_models(tiny_model_dir(family, **overrides), str(tmp_path))
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (6, 29, 50)]
    with Engine(str(tmp_path), skip_tokenizer_init=True, max_total_tokens=2048, chunked_prefill_size=24,
                device="cpu", progress=False) as engine:
        outs = engine.generate(input_ids=prompts, return_logprob=True, sampling_params={
            "temperature": 1.0, "max_new_tokens": 24, "ignore_eos": True, "sampling_seed": 1})
        rollouts = []
        for prompt, out in zip(prompts, outs):
            ids = prompt + out["output_ids"]
            routing, one_pass = _rollout_routing(engine.runner, ids)
            sampled = torch.tensor([e[0] for e in out["meta_info"]["output_token_logprobs"]])
            torch.testing.assert_close(one_pass[len(prompt) - 1:], sampled, atol=1e-5, rtol=0)
            rollouts.append((ids, len(prompt), routing, sampled))

    replay_gap, natural_gap, flipped, tokens = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for ids, start, routing, sampled in rollouts:
            natural = trainer(torch.tensor([ids])).logits[0]
            with replay_routing(trainer, routing[None]):
                replayed = trainer(torch.tensor([ids])).logits[0]
            replay_gap = max(replay_gap, float((_token_logprobs(replayed, ids, start) - sampled).abs().max()))
            natural_gap = max(natural_gap, float((_token_logprobs(natural, ids, start) - sampled).abs().max()))
            own = _hf_routing(trainer, ids)
            flipped += int((own.sort(-1).values != routing.sort(-1).values).any(-1).any(-1).sum())
            tokens += len(ids)
    print(f"{variant}: routing differs on {flipped} of {tokens} tokens; max |trainer - rollout| logprob: "
          f"with replay {replay_gap:.2e}, without {natural_gap:.2e}")
    assert flipped > 0
    assert replay_gap < 1e-5
    assert natural_gap > 1e-3
