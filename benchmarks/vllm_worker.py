"""Runs inside vLLM's own venv (it imports nothing of this project): the vLLM side of a benchmark.

Reads one JSON job on stdin: {"model_path", "threads", "enforce_eager", "workloads": [{"name", "prompts",
"n", "new_tokens", "temperature"}]}; prints one JSON line per workload: {"name", "new_tokens", "seconds"}.
vLLM gets the same token ids, n, temperature, ignore_eos and sampled-token logprobs as our engine, and a
warm-up generate first, as ours does.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    job = json.load(sys.stdin)
    threads = int(job["threads"])
    # vLLM's CPU backend sizes its OpenMP pool from these; bind to the first `threads` cores, like ours.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}" if threads > 1 else "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch
    from vllm import LLM, SamplingParams

    torch.set_num_threads(threads)
    llm = LLM(model=job["model_path"], dtype="float32", enforce_eager=bool(job["enforce_eager"]),
              skip_tokenizer_init=False, seed=0, max_model_len=2048)
    warm = SamplingParams(max_tokens=4, temperature=0.0)
    llm.generate([{"prompt_token_ids": job["workloads"][0]["prompts"][0][:16]}], warm, use_tqdm=False)
    for w in job["workloads"]:
        params = SamplingParams(n=w["n"], temperature=w["temperature"], max_tokens=w["new_tokens"],
                                min_tokens=w["new_tokens"], ignore_eos=True, logprobs=0)
        # No per-request seed: vLLM's CPU sampler then needs a generator offset, which torch's CPU
        # generator refuses ("CPU Generator does not use offset"); LLM(seed=0) seeds the run instead.
        prompts = [{"prompt_token_ids": p} for p in w["prompts"]]
        # One untimed call with the same settings: vLLM sets up its sampler path on first use.
        llm.generate(prompts[:1], params.clone() if hasattr(params, "clone") else params, use_tqdm=False)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        produced = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        print(json.dumps({"name": w["name"], "new_tokens": produced, "seconds": seconds}), flush=True)


if __name__ == "__main__":
    main()
