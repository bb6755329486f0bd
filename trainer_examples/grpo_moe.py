"""GRPO on a tiny mixture-of-experts model, with routing replay.

    python -m trainer_examples.grpo_moe            # 20 steps, a few minutes on 2 cores
    python -m trainer_examples.grpo_moe --steps 2  # the CI version

Builds a small random Qwen3-MoE (8 experts, top-2 per token, 2 layers) on the default model's tokenizer,
serves it, and trains it on "What is a + b?" prompts against a toy reward (the share of frequent tokens in the
answer: a random model never gets the sum right, so the exact-answer reward would carry no signal). Each step's
rollouts come with the experts the server routed every token to (`return_routed_experts`); the trainer
recomputes the rollout logprobs twice, with its own routing and replaying the server's
(`sync.routing_replay.replay_routing`), trains on the replayed ones, and logs both mismatches against the
rollout logprobs, then pushes its weights by broadcast. The server runs in --server-dtype (bfloat16 by
default, as rollout engines do): its routing then differs from the fp32 trainer's on some tokens, and
replay removes that part of the mismatch (the rest is bf16 rounding). Measured (20 steps, 2 cores): routing
differs on 2-4 % of the trained tokens; |dlogp| mean 1.1e-2-1.6e-2 with replay against 1.7e-2-6e-2
without, max about 5e-2-8e-2 against 0.7-1.9. With --server-dtype float32 both are about 1e-7 (the two
route alike). The toy reward stays near its base rate (about 0.04) over such a short run: the example
shows the mismatch, not learning.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import rollout
from sync.routing_replay import replay_routing
from trainer_examples import grpo
from trainer_examples.addition_task import AdditionTask
from trainer_examples.reward_plot import write_reward_png
from trainer_examples.weight_sync import BroadcastSync

FREQUENT_TOKENS = 2000
INIT_STD = 0.15
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt")


@dataclass
class MoeStepLog:
    step: int
    reward: float
    rollout_s: float
    train_s: float
    update_s: float
    replay_mismatch_mean: float     # |trainer logprob with the server's routing - rollout logprob|
    replay_mismatch_max: float
    natural_mismatch_mean: float    # the same with the trainer's own routing
    natural_mismatch_max: float
    routing_differs: int            # trained tokens whose trainer routing differs from the server's (any layer)
    tokens: int
    trained_samples: int
    rollout_version: str


def build_tiny_moe(directory: str, seed: int) -> str:
    """A random Qwen3-MoE with the default model's tokenizer, saved (with the tokenizer files) to directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeConfig

    from runtime.default_model import default_model_path

    source = Path(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=2048,
                            tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, architectures=["Qwen3MoeForCausalLM"])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # N(0, INIT_STD) rather than transformers' 0.02: peaked logits a policy can shift
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.normal_(0.0, INIT_STD)
    model.save_pretrained(directory, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, Path(directory) / name)
    return directory


def frequent_token_reward(output_ids: list[int]) -> float:
    """The share of output tokens among the tokenizer's FREQUENT_TOKENS lowest ids (BPE ranks its pieces by
    merge order, so these are the short, common ones): a toy reward with variance within a group even for a
    random model, which never gets the sum itself right."""
    return sum(t < FREQUENT_TOKENS for t in output_ids) / max(len(output_ids), 1)


def forward(model: torch.nn.Module, seqs: list[list[int]], starts: list[int],
            routing: list[torch.Tensor] | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(logprobs of seqs[i][starts[i]:], natural top-k [len - 1, layers, k] of each sequence's router logits).

    The model reads seqs[i][:-1] (the positions the server ran), routed by `routing` ([len - 1, layers, k]
    each; padding rows route to expert 0) when given. The head runs only on the positions whose logprobs
    are wanted (the vocabulary is SmolLM2's 49152)."""
    inputs = [s[:-1] for s in seqs]
    width = max(len(s) for s in inputs)
    ids = torch.tensor([s + [0] * (width - len(s)) for s in inputs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in inputs])
    with contextlib.ExitStack() as stack:
        if routing is not None:
            padded = torch.zeros(len(inputs), width, *routing[0].shape[1:], dtype=torch.long)
            for i, r in enumerate(routing):
                padded[i, :r.shape[0]] = r
            stack.enter_context(replay_routing(model, padded))
        out = model.model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    k = model.config.num_experts_per_tok
    topk = torch.stack([lg.topk(k, dim=-1).indices for lg in out.router_logits], dim=1).view(len(inputs), width, -1, k)
    logps, natural = [], []
    for i, (s, start) in enumerate(zip(seqs, starts)):
        logits = model.lm_head(out.last_hidden_state[i, start - 1:len(s) - 1]).float()
        logps.append(torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(s[start:]).unsqueeze(-1)).squeeze(-1))
        natural.append(topk[i, :len(s) - 1])
    return logps, natural


def train_step(model, opt, batch, clip: float) -> tuple[list[float], list[float], int]:
    """batch: (sequence, prompt length, rollout logprobs, advantage, routed experts). One optimizer step on the
    replayed logprobs; answers |replayed - rollout| and |natural - rollout| per trained token, and how many
    of those tokens the trainer's own routers send elsewhere (any layer)."""
    seqs, starts = [b[0] for b in batch], [b[1] for b in batch]
    with torch.no_grad():
        natural, own = forward(model, seqs, starts, None)
    replayed, _ = forward(model, seqs, starts, [b[4] for b in batch])
    total = sum(len(s) - st for s, st in zip(seqs, starts))
    loss = torch.zeros(())
    replay_d, natural_d, differs = [], [], 0
    for (seq, start, old, adv, routed), new, nat, mine in zip(batch, replayed, natural, own):
        replay_d += (new.detach() - old).abs().tolist()
        natural_d += (nat - old).abs().tolist()
        differs += int((mine[start - 1:].sort(-1).values != routed[start - 1:].sort(-1).values)
                       .any(-1).any(-1).sum())
        ratio = torch.exp(new - old)
        loss = loss - torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv).sum() / total
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return replay_d, natural_d, differs


def run(args: argparse.Namespace, client: rollout.RolloutClient, path: str) -> list[MoeStepLog]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.trainer_threads)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    sync = BroadcastSync(client, verify=args.verify)
    sync.prepare(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    task = AdditionTask(tokenizer, seed=args.seed)
    logs: list[MoeStepLog] = []
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": 1.0}
    log_path = os.path.join(args.out, "log.jsonl")
    try:
        with open(log_path, "w") as log_file:
            for step in range(1, args.steps + 1):
                t0 = time.monotonic()
                problems = task.sample(args.prompts)
                groups = client.generate([p.prompt_ids for p in problems], sampling, n=args.n, return_logprob=True,
                                         return_routed_experts=True)
                rewards = [[frequent_token_reward(r.output_ids) for r in g] for g in groups]
                adv = grpo.advantages(rewards)
                batch = [(p.prompt_ids + r.output_ids, len(p.prompt_ids), torch.tensor(r.output_logprobs), a,
                          r.routed_experts)
                         for p, g, ag in zip(problems, groups, adv) for r, a in zip(g, ag) if r.output_ids]
                t1 = time.monotonic()
                replay_d, natural_d, differs = train_step(model, opt, batch, args.clip)
                t2 = time.monotonic()
                update_s = sync.push(model, f"step-{step}")
                flat = [x for g in rewards for x in g]
                entry = MoeStepLog(step, sum(flat) / len(flat), t1 - t0, t2 - t1, update_s,
                                   sum(replay_d) / len(replay_d), max(replay_d), sum(natural_d) / len(natural_d),
                                   max(natural_d), differs, len(replay_d), sum(a != 0 for ag in adv for a in ag),
                                   groups[0][0].weight_version)
                logs.append(entry)
                log_file.write(json.dumps(asdict(entry)) + "\n")
                log_file.flush()
                print(f"step {step:3d}  reward {entry.reward:.3f}  |dlogp| with replay mean "
                      f"{entry.replay_mismatch_mean:.2e} max {entry.replay_mismatch_max:.2e}  without replay mean "
                      f"{entry.natural_mismatch_mean:.2e} max {entry.natural_mismatch_max:.2e}  routing differs on "
                      f"{differs}/{entry.tokens} tokens  rollout {entry.rollout_s:.1f}s train {entry.train_s:.1f}s "
                      f"update {update_s:.2f}s  (rollouts from {entry.rollout_version})", flush=True)
    finally:
        sync.close()
        if logs:
            png = os.path.join(args.out, "reward.png")
            how = write_reward_png(png, [e.reward for e in logs], "GRPO on a tiny MoE with routing replay")
            print(f"wrote {png} ({how}) and {log_path}", flush=True)
    return logs


def main(argv: list[str] | None = None) -> None:
    p = grpo.argument_parser("trainer_examples.grpo_moe", __doc__, default_out="grpo_moe_out")
    p.add_argument("--server-dtype", default="bfloat16", help="the rollout server's dtype (the trainer runs fp32)")
    p.set_defaults(steps=20, lr=3e-3, prompts=4)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = build_tiny_moe(os.path.join(args.out, "tiny-moe"), args.seed)
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(rollout.launch_server(path, num_threads=args.server_threads,
                                                           device=args.server_device, dtype=args.server_dtype))
        client = stack.enter_context(rollout.RolloutClient([server.url]))
        run(args, client, path)


if __name__ == "__main__":
    main()
