"""`python -m benchmarks.scoring`: reward scoring through the server's /classify beside transformers'
batched forward on the same model, in the same run.

Builds a reward model (SmolLM2-135M-Instruct with a seeded LlamaForSequenceClassification head; `--tiny`
for a tiny random one), makes `--pairs` chat-formatted prompt+response pairs of about `--tokens` tokens
(lengths vary from half to one and a half times that, as rollouts do), then times
- the server: one /classify call with every text (warm-up call first), and
- transformers: the same texts, tokenized, sorted by length and cut into padded batches of
  `--hf-batch-size` (right padding, the model reads the last non-pad token), under torch.inference_mode.
  Sorting first is what a user scoring a batch would do: neighbours have about the same length, so
  padding wastes little (unsorted batches pad every text to the longest of 32 random ones),
and prints both, the ratio, and the largest reward difference between them. Only meaningful on a quiet
machine; the server's advantage comes from packing sequences without any padding.

    python -m benchmarks.scoring                       # 256 pairs of ~200 tokens on SmolLM2
    python -m benchmarks.scoring --tiny --pairs 16 --tokens 40   # a quick check that it runs
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time

import requests
import torch

import rollout
from tests.helpers import make_tiny_model_dir
from tests.scoring_models import make_reward_model_dir

WORDS = ("the policy model answers questions about rivers mountains numbers proofs code tests weather history "
         "music cells planets language reward training gradient batch token answer because therefore however "
         "first second finally example result").split()


def make_texts(tokenizer, pairs: int, tokens: int, seed: int) -> list[str]:
    """Chat-formatted prompt + response texts of varied length (about `tokens` tokens on average)."""
    rng = random.Random(seed)
    texts = []
    for _ in range(pairs):
        n = rng.randint(tokens // 2, tokens * 3 // 2)
        prompt = " ".join(rng.choice(WORDS) for _ in range(max(n // 4, 1)))
        response = " ".join(rng.choice(WORDS) for _ in range(max(n - n // 4 - 12, 1)))
        texts.append(tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False))
    return texts


def time_server(path: str, texts: list[str], threads: int | None) -> tuple[float, list[float]]:
    with rollout.launch_server(path, is_embedding=True, log_level="warning", max_running_requests=max(len(texts), 1),
                               num_threads=threads) as server:
        requests.post(server.url + "/classify", json={"text": texts[: min(8, len(texts))]}, timeout=600)  # warm-up
        start = time.perf_counter()
        resp = requests.post(server.url + "/classify", json={"text": texts}, timeout=3600)
        seconds = time.perf_counter() - start
        resp.raise_for_status()
        return seconds, [o["embedding"][0] for o in resp.json()]


@torch.inference_mode()
def time_transformers(path: str, texts: list[str], batch_size: int) -> tuple[float, list[float]]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "right"
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    model(**tok(texts[:2], padding=True, return_tensors="pt"))  # warm-up
    start = time.perf_counter()
    ids = tok(texts)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
    rewards = [0.0] * len(texts)
    for k in range(0, len(order), batch_size):
        batch = order[k:k + batch_size]
        enc = tok.pad({"input_ids": [ids[i] for i in batch]}, padding=True, return_tensors="pt")
        for i, reward in zip(batch, model(**enc).logits[:, 0].tolist()):
            rewards[i] = reward
    return time.perf_counter() - start, rewards


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scoring", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=200, help="average tokens per prompt+response")
    parser.add_argument("--hf-batch-size", type=int, default=32)
    parser.add_argument("--tiny", action="store_true", help="a tiny random reward model instead of SmolLM2")
    parser.add_argument("--model-path", help="an existing reward model directory (with tokenizer files)")
    parser.add_argument("--num-threads", type=int, default=None, help="torch threads, both sides")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)

    from transformers import AutoTokenizer

    workdir = tempfile.mkdtemp(prefix="bench-scoring-")
    try:
        path = args.model_path
        if path is None:
            if args.tiny:
                base = make_tiny_model_dir(f"{workdir}/base", hidden_size=64, num_layers=2)
            else:
                from runtime.default_model import default_model_path
                base = default_model_path()
            path = make_reward_model_dir(f"{workdir}/rm", base, seed=args.seed)
        texts = make_texts(AutoTokenizer.from_pretrained(path), args.pairs, args.tokens, args.seed)
        num_tokens = sum(len(t) for t in AutoTokenizer.from_pretrained(path)(texts)["input_ids"])
        server_s, server_rewards = time_server(path, texts, args.num_threads)
        hf_s, hf_rewards = time_transformers(path, texts, args.hf_batch_size)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    diff = max(abs(a - b) for a, b in zip(server_rewards, hf_rewards))
    result = {"pairs": args.pairs, "tokens": num_tokens, "server_s": round(server_s, 3),
              "transformers_s": round(hf_s, 3), "speedup": round(hf_s / server_s, 3),
              "server_tokens_per_s": round(num_tokens / server_s, 1),
              "transformers_tokens_per_s": round(num_tokens / hf_s, 1), "max_reward_diff": diff}
    print(f"server /classify: {server_s:.3f} s ({num_tokens / server_s:.0f} tokens/s)")
    print(f"transformers (sorted by length, padded batches of {args.hf_batch_size}): {hf_s:.3f} s "
          f"({num_tokens / hf_s:.0f} tokens/s)")
    print(f"speedup: {hf_s / server_s:.2f}x   max reward difference: {diff:.2e}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
