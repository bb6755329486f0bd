"""The GRPO loop the examples share: rollouts from the server, group-normalized advantages, a clipped
importance-ratio loss against the rollout logprobs, one optimizer step, then a weight push.

Plain PyTorch + transformers on the trainer side; only `rollout` (client) and `sync` (through the client)
on the serving side.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from rollout import GenerateResult, RolloutClient
from trainer_examples.addition_task import AdditionTask, Problem
from trainer_examples.reward_plot import write_reward_png


@dataclass
class StepLog:
    step: int
    reward: float
    rollout_s: float
    train_s: float
    update_s: float          # 0 on steps without a weight push
    mismatch_mean: float     # |rollout logprob - trainer logprob| over trained tokens
    mismatch_max: float
    trained_samples: int     # samples with nonzero advantage (the rest carry no gradient)
    rollout_version: str     # the weight version that produced the step's rollouts
    mismatch_tokens: int = 0  # how many trained tokens mismatch_mean/max are over


def argument_parser(module: str, doc: str | None, default_out: str) -> argparse.ArgumentParser:
    """The options every example shares; `default_out` keeps each example's log and PNG apart."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps (CI runs 2)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--n", type=int, default=4, help="samples per prompt (the GRPO group)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--clip", type=float, default=0.2, help="PPO clip range of the importance ratio")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward")
    p.add_argument("--trainer-threads", type=int, default=2,
                   help="the server idles while the trainer steps (rollouts are synchronous), so both cores")
    p.add_argument("--server-threads", type=int, default=1)
    p.add_argument("--server-device", default=None,
                   help="device of the servers the example starts (default: theirs, cuda if present, else cpu)")
    p.add_argument("--model-path", default=None, help="policy (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", default=default_out, help="folder for the log (JSONL) and the reward curve (PNG)")
    p.add_argument("--verify", action="store_true", help="read weights back from the servers after each push")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true",
                   help="servers started with --enable-deterministic-inference and the trainer's logprobs from "
                        "runtime/trainer_forward.py: every step's |dlogp| is exactly 0 (true on-policy; CPU)")
    return p


def token_logprobs(model: torch.nn.Module, seqs: list[list[int]], starts: list[int]) -> list[torch.Tensor]:
    """Log-probabilities of seqs[i][starts[i]:] under the model (fp32, full vocabulary, temperature 1:
    what the server reports for sampling at temperature 1)."""
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    out = []
    for i, (s, start) in enumerate(zip(seqs, starts)):
        lp = torch.log_softmax(logits[i, start - 1:len(s) - 1], dim=-1)
        out.append(lp.gather(-1, ids[i, start:len(s)].unsqueeze(-1)).squeeze(-1))
    return out


def advantages(rewards: list[list[float]]) -> list[list[float]]:
    """GRPO: reward minus the group mean, over the group's std (0 for a group whose samples all agree)."""
    out = []
    for group in rewards:
        t = torch.tensor(group)
        std = t.std().item() if len(group) > 1 else 0.0
        out.append([0.0] * len(group) if std < 1e-6 else ((t - t.mean()) / (std + 1e-4)).tolist())
    return out


LogprobFn = Callable[[list[list[int]], list[int]], list[torch.Tensor]]


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, problems: list[Problem],
               groups: list[list[GenerateResult]], adv: list[list[float]], clip: float,
               micro_batch: int, logprobs: LogprobFn | None = None) -> tuple[list[float], int]:
    """One optimizer step on the samples with nonzero advantage; answers the |logprob differences| of
    every trained token and the number of samples trained. `logprobs(seqs, starts)` replaces the plain
    transformers forward (token_logprobs), e.g. by the deterministic one."""
    batch = [(p.prompt_ids + r.output_ids, len(p.prompt_ids), torch.tensor(r.output_logprobs), a)
             for p, g, ag in zip(problems, groups, adv) for r, a in zip(g, ag) if a != 0.0 and r.output_ids]
    diffs: list[float] = []
    if not batch:
        return diffs, 0
    total_tokens = sum(len(b[0]) - b[1] for b in batch)
    opt.zero_grad(set_to_none=True)
    for k in range(0, len(batch), micro_batch):
        part = batch[k:k + micro_batch]
        seqs, starts = [b[0] for b in part], [b[1] for b in part]
        logps = logprobs(seqs, starts) if logprobs is not None else token_logprobs(model, seqs, starts)
        loss = torch.zeros(())
        for (_, _, old, a), new in zip(part, logps):
            diffs.extend((new.detach() - old).abs().tolist())
            ratio = torch.exp(new - old)  # importance ratio against the policy that sampled (the server's)
            surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
            loss = loss - surrogate.sum() / total_tokens
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return diffs, len(batch)


Scorer = Callable[[list[Problem], list[list[GenerateResult]]], list[list[float]]]


def served_model_path(client: RolloutClient) -> str:
    """The directory of the model the (first) server runs, as it reports it: a server started without
    --model-path serves the embedded SmolLM2, and the trainer starts from the same weights."""
    return client.model_info()[0]["model_path"]


def run(args: argparse.Namespace, client: RolloutClient, make_sync: Callable[[], object], title: str,
        scorer: Scorer | None = None) -> list[StepLog]:
    """The loop; `make_sync()` builds a BroadcastSync or DiskSync (after the servers are up); `scorer`
    replaces the task's verifiable reward (the reward-model example)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.trainer_threads)  # the server(s) take the other core(s)
    path = args.model_path or served_model_path(client)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train()
    sync = make_sync()
    sync.prepare(model)  # before the optimizer: it may move the parameters (BroadcastSync lays them flat)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    logprobs: LogprobFn | None = None
    if getattr(args, "deterministic", False):
        # The rollout's kernels on the trainer's parameters: the same bits as the server's logprobs.
        from runtime.trainer_forward import TrainerForward
        logprobs = TrainerForward(model).token_logprobs
    task = AdditionTask(tokenizer, seed=args.seed)
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "log.jsonl")
    logs: list[StepLog] = []
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": 1.0}
    try:
        with open(log_path, "w") as log_file:
            for step in range(1, args.steps + 1):
                t0 = time.monotonic()
                problems = task.sample(args.prompts)
                groups = client.generate([p.prompt_ids for p in problems], sampling, n=args.n, return_logprob=True)
                rewards = (scorer(problems, groups) if scorer is not None else
                           [[task.reward(p, r.text or "") for r in g] for p, g in zip(problems, groups)])
                t1 = time.monotonic()
                diffs, trained = train_step(model, opt, problems, groups, advantages(rewards), args.clip,
                                            args.micro_batch, logprobs)
                t2 = time.monotonic()
                update_s = sync.push(model, f"step-{step}") if sync.due(step) else 0.0
                flat = [x for g in rewards for x in g]
                entry = StepLog(step, sum(flat) / len(flat), t1 - t0, t2 - t1, update_s,
                                sum(diffs) / len(diffs) if diffs else 0.0, max(diffs, default=0.0), trained,
                                groups[0][0].weight_version, len(diffs))
                logs.append(entry)
                log_file.write(json.dumps(asdict(entry)) + "\n")
                log_file.flush()
                print(f"step {step:3d}  reward {entry.reward:.3f}  rollout {entry.rollout_s:5.1f}s  "
                      f"train {entry.train_s:5.1f}s  update {entry.update_s:5.2f}s  |dlogp| mean "
                      f"{entry.mismatch_mean:.2e} max {entry.mismatch_max:.2e} over {len(diffs)} tokens  "
                      f"trained {trained}  "
                      f"(rollouts from {entry.rollout_version})", flush=True)
    finally:
        sync.close()
        if logs:
            png = os.path.join(args.out, "reward.png")
            how = write_reward_png(png, [e.reward for e in logs], title)
            print(f"wrote {png} ({how}) and {log_path}", flush=True)
    return logs
