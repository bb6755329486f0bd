"""The cost of `--enable-deterministic-inference`: the same workloads by the Engine in its default mode (as
shipped: CUDA graphs where the device has them) and in deterministic mode, in one process, one after the
other; tokens/s of each and the time ratio. Used by benchmarks/gpu_check.py ("deterministic" part) and
tests/test_deterministic_gpu.py; on CPU `python -m benchmarks.generation --deterministic` prints the same
comparison beside the other systems.

    python -m benchmarks.deterministic_cost --model-path PATH [--device cuda] [--dtype bfloat16]

Every workload is seeded (one sampling_seed per prompt, T = 1), so the deterministic mode's second run of
the first workload must give the first run's tokens: `repeatable` records whether it did.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from runtime.engine import Engine

Shape = tuple[int, int, int, int]   # prompts, prompt length, n, new tokens


def _prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(count)]


def _run(eng: Engine, ps: list[list[int]], n: int, new_tokens: int) -> tuple[float, list[list[int]]]:
    params = [{"max_new_tokens": new_tokens, "temperature": 1.0, "n": n, "ignore_eos": True, "sampling_seed": 1000 + i}
              for i in range(len(ps))]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = eng.generate(input_ids=ps, sampling_params=params)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert sum(len(o["output_ids"]) for o in out) == len(ps) * n * new_tokens
    return seconds, [o["output_ids"] for o in out]


def deterministic_cost(path: str, device: str, dtype: str, shapes: list[Shape],
                       engine_args: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (workload, mode): seconds, tokens/s, and for the deterministic mode whether a second run
    of the first workload repeated its tokens; the deterministic rows also carry time_ratio (to default)."""
    rows: list[dict[str, Any]] = []
    for system, extra in (("default", {}), ("deterministic", {"enable_deterministic_inference": True})):
        eng = Engine(path, skip_tokenizer_init=True, progress=False, device=device, dtype=dtype,
                     **{**engine_args, **extra})
        try:
            vocab = eng.runner.vocab_size
            eng.generate(input_ids=_prompts(4, 16, vocab, 2), sampling_params={"max_new_tokens": 8, "ignore_eos": True})
            for i, (count, length, n, new) in enumerate(shapes):
                ps = _prompts(count, length, vocab, 20 + i)
                eng.flush_cache()
                seconds, tokens = _run(eng, ps, n, new)
                row = {"workload": f"{count} prompts x n {n}, {new} new", "system": system,
                       "tokens": count * n * new, "seconds": seconds, "tokens_per_s": count * n * new / seconds}
                if system == "deterministic" and i == 0:
                    eng.flush_cache()
                    row["repeatable"] = _run(eng, ps, n, new)[1] == tokens
                rows.append(row)
        finally:
            eng.shutdown()
        del eng
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    default = {r["workload"]: r["seconds"] for r in rows if r["system"] == "default"}
    for r in rows:
        if r["system"] == "deterministic":
            r["time_ratio"] = r["seconds"] / default[r["workload"]]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--shapes", default="16,100,8,64;1,100,1,64",
                        help="prompts,prompt_len,n,new_tokens per workload, ';'-separated")
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]
    for row in deterministic_cost(args.model_path, args.device, args.dtype, shapes, {}):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
