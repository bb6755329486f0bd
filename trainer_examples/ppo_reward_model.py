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
    """`base` (SmolLM2) as a LlamaForSequenceClassification whose score head is the <|im_end|> unembedding
    row minus the mean row, saved with its tokenizer to `path` (once)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    config = AutoConfig.from_pretrained(base)
    config.architectures = ["LlamaForSequenceClassification"]
    config.num_labels = 1
    if config.pad_token_id is None:  # transformers needs one to find the last token of a padded batch
        config.pad_token_id = config.eos_token_id if isinstance(config.eos_token_id, int) else 0
    tokenizer = AutoTokenizer.from_pretrained(base)
    causal = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    missing, _ = model.load_state_dict(causal.state_dict(), strict=False)
    assert missing == ["score.weight"], missing
    emb = causal.get_input_embeddings().weight  # SmolLM2 ties its unembedding to the embedding
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        model.score.weight.copy_((emb[end] - emb.mean(0)).unsqueeze(0))
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> None:
    p = grpo.argument_parser("trainer_examples.ppo_reward_model", __doc__, default_out="ppo_rm_out")
    args = p.parse_args(argv)
    with contextlib.ExitStack() as stack:
        policy = stack.enter_context(rollout.launch_server(args.model_path, num_threads=args.server_threads,
                                                          device=args.server_device,
                                                          enable_deterministic_inference=args.deterministic))
        client = stack.enter_context(RolloutClient([policy.url]))
        # The reward model is built from the policy the server runs (the embedded SmolLM2 by default).
        rm_path = make_reward_model(grpo.served_model_path(client), os.path.join(args.out, "reward_model"))
        rm = stack.enter_context(rollout.launch_server(rm_path, is_embedding=True, num_threads=args.server_threads,
                                                      device=args.server_device))
        rm_client = stack.enter_context(RolloutClient([rm.url]))

        def score(problems: list[Problem], groups: list[list[GenerateResult]]) -> list[list[float]]:
            seqs = [p.prompt_ids + r.output_ids for p, g in zip(problems, groups) for r in g]
            raw = [r.reward for r in rm_client.classify(seqs)]  # the score head's logit, one per sample
            n = len(groups[0])
            return [raw[i * n:(i + 1) * n] for i in range(len(groups))]

        grpo.run(args, client, lambda: BroadcastSync(client, verify=args.verify), "PPO-style, reward model", score)


if __name__ == "__main__":
    main()
