"""`python -m benchmarks.moe`: MoE rollout throughput of the Engine beside transformers' generate, same work.

The model is a Qwen3-MoE of about SmolLM2-135M's active size (hidden 576, 30 layers, 9 heads / 3 KV heads,
vocabulary 49152, tied embeddings) whose MLPs are 8 experts of 768, top-2 (so 1536 active MLP columns per
token, as SmolLM2's dense 1536): ~135M active, ~400M total parameters. It is built with transformers'
own initialization from a fixed seed and saved once under --model-dir.

Workload (GRPO-shaped, as benchmarks of the dense model): P prompts of about L tokens, n samples each,
T new tokens, temperature 1, ignore_eos; transformers gets the same batch left-padded with
num_return_sequences=n, once per experts implementation: `grouped_mm` (transformers' default since v5, one
grouped GEMM over the experts) and `eager` (its Python loop over the experts, the baseline issue 14 names).
All run in this process on the same device and dtype (the Engine's: fp32 on the CPU, bf16 on a GPU). Prints
tokens/s of each and the ratios (ours / each).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from benchmarks.generation import make_prompts, run_ours, run_transformers
from runtime.engine import Engine
from runtime.models.moe import SparseMoeBlock

SMOLLM2_SIZED_MOE = dict(
    vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    head_dim=64, intermediate_size=1536, moe_intermediate_size=768, num_experts=8, num_experts_per_tok=2,
    norm_topk_prob=True, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, bos_token_id=1, eos_token_id=2,
)


def build_checkpoint(model_dir: Path, num_layers: int, seed: int) -> str:
    """The seeded random MoE checkpoint (built and saved on first use)."""
    path = model_dir / f"qwen3-moe-smollm2-size-{num_layers}l-seed{seed}"
    if not (path / "config.json").exists():
        config = Qwen3MoeConfig(**{**SMOLLM2_SIZED_MOE, "num_hidden_layers": num_layers})
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(str(path))
    return str(path)


def moe_blocks_seconds(model: torch.nn.Module, prompt_lens: list[int], n: int, new_tokens: int) -> float:
    """Time of the workload's MoE blocks alone: each layer's router and experts run on random hidden states
    of the model's scale, at the prefill's row count once and at the decode batch (prompts x n rows) for
    every new token. A floor for any engine that computes the same expert products."""
    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    hidden = blocks[0].gate.weight.shape[1]
    dtype, device = blocks[0].gate.weight.dtype, blocks[0].gate.weight.device
    total = 0.0
    with torch.inference_mode():
        for rows, times in ((sum(prompt_lens), 1), (len(prompt_lens) * n, new_tokens)):
            h = torch.randn(rows, hidden, dtype=dtype, device=device)
            blocks[0](h, None)  # warm-up
            start = time.perf_counter()
            for block in blocks:
                block(h, None)
            if device.type == "cuda":
                torch.cuda.synchronize()
            total += (time.perf_counter() - start) * times
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=Path.home() / ".cache" / "rl-rollout" / "bench")
    parser.add_argument("--num-layers", type=int, default=30, help="fewer for a quick check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=100)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default=None, help="default: the Engine's (cuda when present)")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--transformers-experts", default="grouped_mm,eager",
                        help="transformers' experts implementations to run (its default since v5 is grouped_mm: "
                             "torch's grouped GEMM; eager is its Python loop over the experts)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    path = build_checkpoint(args.model_dir, args.num_layers, args.seed)
    engine_args = {"device": args.device} if args.device else {}
    engine = Engine(path, skip_tokenizer_init=True, progress=False, **engine_args)
    device, dtype = engine.runner.device, engine.runner.dtype
    prompts = make_prompts(args.num_prompts, args.prompt_len, SMOLLM2_SIZED_MOE["vocab_size"], seed=0)
    warm = make_prompts(2, 16, SMOLLM2_SIZED_MOE["vocab_size"], seed=2)
    name = f"GRPO {args.num_prompts} prompts x n={args.n}, {args.new_tokens} new tokens, T=1"

    engine.generate(input_ids=warm, sampling_params={"max_new_tokens": 4})
    engine.flush_cache()
    results = [run_ours(engine, prompts, args.n, args.new_tokens, 1.0)]
    bound_s = moe_blocks_seconds(engine.runner.model, [len(p) for p in prompts], args.n, args.new_tokens)
    engine.shutdown()
    del engine

    if not args.skip_transformers:
        for experts in args.transformers_experts.split(","):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation=experts)
            model = model.to(device).eval()
            run_transformers(model, warm, 1, 4, 0.0, 0)
            result = run_transformers(model, prompts, args.n, args.new_tokens, 1.0, 0)
            result.system = f"transformers ({experts})"
            results.append(result)
            del model
    for r in results:
        r.workload = name

    print(f"\ntorch threads: {torch.get_num_threads()}, device: {device}, dtype: {dtype}, model: {path}")
    print(f"{'workload':<58} {'system':<24} {'tokens':>7} {'seconds':>8} {'tok/s':>8}")
    for r in results:
        print(f"{r.workload:<58} {r.system:<24} {r.new_tokens:>7} {r.seconds:>8.2f} {r.tokens_per_s:>8.1f}")
    for r in results[1:]:
        print(f"ratio ours/{r.system}, {name}: {results[0].tokens_per_s / r.tokens_per_s:.2f}x")
    print(f"the MoE blocks alone (router + experts at the workload's shapes, every layer): {bound_s:.2f} s, "
          f"{100 * bound_s / results[0].seconds:.0f} % of ours ({results[0].seconds:.2f} s); transformers computes "
          "the same expert products")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"tokens_per_s": r.tokens_per_s} for r in results], f, indent=1)


if __name__ == "__main__":
    main()
