"""PPO-style scoring with a reward model: a policy server and a reward-model server (/classify) side by side.

    python -m trainer_examples.ppo_reward_model --steps 2

The reward model is SmolLM2 with a sequence-classification head, built once into --out: its score is the
policy's own end-of-turn logit at the last token (the head is the unembedding row of <|im_end|>), so it
rewards answers that read as finished. Each step: the policy samples, the reward server scores prompt +
answer with /classify, advantages are the rewards minus the batch mean over their std, and the clipped
importance-ratio loss against the rollout logprobs updates the policy, pushed by broadcast.
"""

from __future__ import annotations

import contextlib
import os

import rollout
from rollout import GenerateResult, RolloutClient
from trainer_examples import grpo
from trainer_examples.addition_task import Problem
from trainer_examples.weight_sync import BroadcastSync


def make_reward_model(base: str, path: str) -> str:
    """SmolLM2 + LlamaForSequenceClassification whose score head is the <|im_end|> unembedding row."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from rollout.testing_scoring import make_reward_model_dir

    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    make_reward_model_dir(path, base)
    end = AutoTokenizer.from_pretrained(base).convert_tokens_to_ids("<|im_end|>")
    file = os.path.join(path, "model.safetensors")
    weights = load_file(file)
    emb = weights["model.embed_tokens.weight"]  # SmolLM2 ties its unembedding to the embedding
    weights["score.weight"] = (emb[end] - emb.mean(0)).unsqueeze(0).clone()
    save_file(weights, file, metadata={"format": "pt"})
    return path


def main(argv: list[str] | None = None) -> None:
    p = grpo.argument_parser("trainer_examples.ppo_reward_model", __doc__, default_out="ppo_rm_out")
    args = p.parse_args(argv)
    from runtime.default_model import default_model_path

    base = args.model_path or default_model_path()
    rm_path = make_reward_model(base, os.path.join(args.out, "reward_model"))
    with contextlib.ExitStack() as stack:
        policy = rollout.LocalServer(base, num_threads=args.server_threads, device=args.server_device).spawn()
        stack.callback(policy.stop)
        rm = rollout.LocalServer(rm_path, is_embedding=True, num_threads=args.server_threads,
                                  device=args.server_device).spawn()
        stack.callback(rm.stop)
        policy.wait_until_ready()
        rm.wait_until_ready()
        client = stack.enter_context(RolloutClient([policy.url]))
        rm_client = stack.enter_context(RolloutClient([rm.url]))

        def score(problems: list[Problem], groups: list[list[GenerateResult]]) -> list[list[float]]:
            seqs = [p.prompt_ids + r.output_ids for p, g in zip(problems, groups) for r in g]
            raw = [r.reward for r in rm_client.classify(seqs)]  # the score head's logit, one per sample
            n = len(groups[0])
            return [raw[i * n:(i + 1) * n] for i in range(len(groups))]

        grpo.run(args, client, lambda: BroadcastSync(client, verify=args.verify), "PPO-style, reward model", score)


if __name__ == "__main__":
    main()
