"""The device check: proves the GPU path on one H100/H200 in a few minutes, prints one summary table and
writes JSON. `benchmarks/gpu_check.sh` installs the carried wheels and runs it; README, "GPU".

    python -m benchmarks.gpu_check --out gpu_check.json              # on the GPU machine
    python -m benchmarks.gpu_check --device cpu --tiny                # here: the driver end to end, tiny shapes

Parts (each recorded even when another fails):
- tests: the `gpu`-marked tests (Triton kernels compiled, fp32 with IEEE dots and bf16; the engine with the
  Triton backend; CUDA graphs; NCCL updates) in a pytest child process;
- parity, per model (SmolLM2-135M's and Qwen2.5-0.5B's shapes, seeded random weights): fp32 greedy tokens
  equal transformers' with TF32 off, bf16 top-1 agreement (benchmarks/gpu_check_generation.py);
- workloads: GRPO-shaped rollouts (16 prompts x n 8, 64 new tokens) and a larger one (256 x n 8, 256 new)
  by the Engine with and without CUDA graphs and by transformers' generate on the same GPU, bf16;
- weights: a tensor update and a broadcast (NCCL on CUDA) against their raw bounds
  (benchmarks/gpu_check_weights.py);
- deterministic: the cost of --enable-deterministic-inference (the batch-invariant Triton kernels) on the
  GRPO-shaped workload and a single stream, default mode and deterministic mode side by side, bf16
  (benchmarks/deterministic_cost.py); its bitwise checks are the `gpu` tests of tests/test_deterministic_gpu.py
  and tests/test_triton_invariant.py, in "tests".
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks import gpu_check_generation as generation
from benchmarks import gpu_check_weights as weights
from benchmarks.deterministic_cost import deterministic_cost
from benchmarks.gpu_check_models import save_model

ROOT = Path(__file__).resolve().parents[1]
GPU_TESTS = ["tests/test_triton_attention.py", "tests/test_triton_kernels.py", "tests/test_cuda_graph.py",
             "tests/test_weights_direct.py", "tests/test_triton_invariant.py", "tests/test_deterministic_gpu.py"]


def run_tests(timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *GPU_TESTS]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", done.stdout)}
    failed = [ln for ln in done.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    skips = sorted({ln.split(": ", 1)[-1] for ln in done.stdout.splitlines() if ln.startswith("SKIPPED")})
    return {"exit": done.returncode, **counts, "failed_tests": failed[:20], "skip_reasons": skips[:10],
            "tail": done.stdout[-2000:] if done.returncode not in (0, 5) else ""}


def _part(results: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as e:   # one broken part must not hide the others' figures
        results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    print(f"[{time.perf_counter() - start:6.1f} s] {name}", flush=True)
    if isinstance(results[name], dict) and "traceback" in results[name]:
        print(results[name]["traceback"], file=sys.stderr, flush=True)


def _plan(device: str, tiny: bool) -> dict[str, Any]:
    if tiny:
        return {"models": ["tiny-llama", "tiny-qwen2"], "parity": (4, 12, 8),
                "workloads": [(2, 12, 2, 8), (4, 12, 2, 16)], "workload_model": "tiny-llama",
                "deterministic": [(2, 12, 2, 8), (1, 12, 1, 8)],
                "engine": dict(max_total_tokens=4096, context_length=256, max_running_requests=16,
                               cuda_graph_max_bs=16), "transformers_max_tokens": 10**9, "weights_model": "tiny-qwen2"}
    return {"models": ["smollm2-135m", "qwen2.5-0.5b"], "parity": (8, 64, 32),
            "workloads": [(16, 100, 8, 64), (256, 100, 8, 256)], "workload_model": "smollm2-135m",
            "deterministic": [(16, 100, 8, 64), (1, 100, 1, 64)],
            "engine": dict(max_total_tokens=400_000, context_length=1024, max_running_requests=512,
                           cuda_graph_max_bs=512, chunked_prefill_size=8192),
            "transformers_max_tokens": 10**9, "weights_model": "qwen2.5-0.5b"}


def check(device: str, tiny: bool, parts: set[str], folder: Path, test_timeout: float) -> dict[str, Any]:
    plan = _plan(device, tiny)
    results: dict[str, Any] = {"device": device, "tiny": tiny, "env": {
        "python": sys.version.split()[0], "torch": torch.__version__,
        "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}}
    for pkg in ("triton", "transformers"):
        try:
            results["env"][pkg] = __import__(pkg).__version__
        except ImportError:
            results["env"][pkg] = None
    if "tests" in parts:
        _part(results, "tests", lambda: run_tests(test_timeout))
    paths = {m: str(save_model(m, folder)) for m in plan["models"]}
    engine_args = plan["engine"]
    if "parity" in parts:
        # A few sequences: small graph buckets keep each engine's start-up short.
        parity_args = dict(engine_args, max_running_requests=16, cuda_graph_max_bs=16)
        for m in plan["models"]:
            _part(results, f"parity {m}", lambda m=m: generation.parity(paths[m], device, *plan["parity"],
                                                                         engine_args=parity_args))
    if "workloads" in parts:
        _part(results, f"workloads {plan['workload_model']}", lambda: generation.workloads(
            paths[plan["workload_model"]], device, "bfloat16", plan["workloads"], engine_args,
            plan["transformers_max_tokens"]))
    if "deterministic" in parts:
        _part(results, f"deterministic {plan['workload_model']}", lambda: deterministic_cost(
            paths[plan["workload_model"]], device, "bfloat16", plan["deterministic"], engine_args))
    if "weights" in parts:
        m = plan["weights_model"]
        _part(results, f"tensor update {m}", lambda: weights.tensor_update(paths[m], device, "bfloat16"))
        _part(results, f"broadcast update {m}", lambda: weights.broadcast_update(paths[m], device, "bfloat16",
                                                                                 timeout=120))
    return results


def summary(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(what, figure, goal or check) rows of the table."""
    rows: list[tuple[str, str, str]] = [("environment", json.dumps(results["env"]), "")]
    for name, r in results.items():
        if not isinstance(r, (dict, list)) or name == "env":
            continue
        if isinstance(r, dict) and "error" in r:
            rows.append((name, "ERROR " + r["error"][:90], "must run"))
        elif name == "tests":
            rows.append((name, ", ".join(f"{r.get(k, 0)} {k}" for k in ("passed", "failed", "skipped")),
                         "0 failed"))
        elif name.startswith("parity"):
            rows.append((name + " fp32 greedy", f"{r['fp32_greedy_identical']}/{r['fp32_sequences']} identical, "
                         f"max |dlogprob| {r['fp32_max_logprob_diff']:.2e}", "all identical"))
            rows.append((name + " bf16 top-1", f"{r['bf16_top1_agreement']:.3f} of {r['bf16_positions']}", ">= 0.95"))
        elif name.startswith("workloads"):
            for w in r:
                figure = "skipped" if w.get("seconds") is None else \
                    f"{w['tokens_per_s']:10.0f} tok/s ({w['seconds']:.2f} s, {w.get('graph_replays', 0)} replays)"
                rows.append((f"{w['workload']}: {w['system']}", figure, ""))
            for wl in sorted({w["workload"] for w in r}):
                by = {w["system"]: w.get("tokens_per_s") for w in r if w["workload"] == wl}
                hf, g, ng = by.get("transformers generate"), by.get("ours, CUDA graphs"), by.get("ours, no graphs")
                if hf and g:
                    rows.append((f"{wl}: ours / transformers", f"{g / hf:.2f}x", ">= 5x"))
                if g and ng:
                    rows.append((f"{wl}: graphs / no graphs", f"{g / ng:.2f}x", ">= 1.5x"))
        elif name.startswith("deterministic"):
            for w in r:
                figure = f"{w['tokens_per_s']:10.0f} tok/s ({w['seconds']:.2f} s)"
                if "time_ratio" in w:
                    figure += f", {w['time_ratio']:.2f}x the default's time"
                if "repeatable" in w:
                    figure += f", repeatable {w['repeatable']}"
                rows.append((f"{name} {w['workload']}: {w['system']}", figure,
                             "<= 1.30x time" if "time_ratio" in w else ""))
        elif name.startswith("tensor update"):
            rows.append((name, f"{r['update_s']:.4f} s vs raw copy {r['raw_copy_s']:.4f} s ({r['ratio']:.2f}x), "
                         f"{r['bytes'] / 2**20:.0f} MiB, landed {r['landed']}", "<= 0.1 s (0.5B)"))
        elif name.startswith("broadcast update"):
            figure = (f"{r['backend']}: {r['update_s']:.4f} s vs raw {r['raw_broadcast_s']:.4f} s ({r['ratio']:.2f}x)"
                      if r.get("ok") else f"FAILED {r.get('error')}: {r.get('stderr_tail', '')[-80:]!r}")
            rows.append((name, figure, "<= 0.1 s (0.5B)"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: checks the driver, not the GPU path")
    parser.add_argument("--parts", default="tests,parity,workloads,deterministic,weights")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--models-dir", default=None, help="where the seeded models are saved (default: a temp dir)")
    parser.add_argument("--test-timeout", type=float, default=300)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda but torch sees no CUDA device (use --device cpu --tiny to check the driver)")
    folder = Path(args.models_dir or tempfile.mkdtemp(prefix="gpu_check_models_"))
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = check(args.device, args.tiny, set(args.parts.split(",")), folder, args.test_timeout)
    results["seconds"] = time.perf_counter() - start
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    rows = summary(results)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'check':<{width}}  {'figure':<72}  goal")
    for what, figure, goal in rows:
        print(f"{what:<{width}}  {figure:<72}  {goal}")
    print(f"\n{results['seconds']:.0f} s in all; JSON in {args.out}")


if __name__ == "__main__":
    main()
