"""`python -m benchmarks.metrics_overhead`: serving throughput with `--enable-metrics` beside the same
server without it (the baseline), on the same closed-loop work, with /metrics scraped every second
during the metrics run (as Prometheus would, faster than its default 15 s).

Each configuration runs `--rounds` times, alternating, and the best round counts (less noise on a
shared machine). A tiny random model by default, so the front end, where metrics are collected,
dominates; `--model-path` for a real one.

    python -m benchmarks.metrics_overhead                     # tiny model, concurrency 1 and 16
    python -m benchmarks.metrics_overhead --concurrency 1,32 --requests 256 --new-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import threading

import requests

import rollout
from benchmarks.serving import LevelResult, _server_level, make_prompts
from tests.helpers import make_tiny_model_dir


def _scrape_every_second(url: str, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        requests.get(url + "/metrics", timeout=30).raise_for_status()


def run_config(model_path: str, enable_metrics: bool, work: dict[int, list[list[int]]], params: dict,
               num_threads: int | None) -> dict[int, LevelResult]:
    extra = {"enable_metrics": True} if enable_metrics else {}
    with rollout.LocalServer(model_path, skip_tokenizer_init=True, log_level="warning", num_threads=num_threads,
                             **extra) as server:
        stop = threading.Event()
        scraper = threading.Thread(target=_scrape_every_second, args=(server.url, stop), daemon=True)
        if enable_metrics:
            scraper.start()

        async def levels() -> dict[int, LevelResult]:
            await _server_level("127.0.0.1", server.port, work[min(work)][:8], params, 4)  # warm-up
            return {c: await _server_level("127.0.0.1", server.port, prompts, params, c) for c, prompts in work.items()}

        try:
            return asyncio.run(levels())
        finally:
            stop.set()
            if enable_metrics:
                scraper.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None, help="default: a tiny random Llama")
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num-threads", type=int, default=1)
    args = parser.parse_args()

    tiny_dir = None
    model_path = args.model_path
    if model_path is None:
        tiny_dir = tempfile.mkdtemp(prefix="bench-metrics-")
        model_path = make_tiny_model_dir(tiny_dir)
    from transformers import AutoConfig
    vocab = AutoConfig.from_pretrained(model_path).vocab_size
    levels = [int(c) for c in args.concurrency.split(",")]
    work = {c: make_prompts(args.requests, args.prompt_len, vocab, seed=c) for c in levels}
    params = {"max_new_tokens": args.new_tokens, "ignore_eos": True, "temperature": 1.0}

    best: dict[tuple[bool, int], float] = {}
    for r in range(args.rounds):
        for enabled in (False, True):
            results = run_config(model_path, enabled, work, params, args.num_threads)
            for c, res in results.items():
                best[(enabled, c)] = max(best.get((enabled, c), 0.0), res.tokens_per_s)
                print(f"round {r} metrics={'on ' if enabled else 'off'} c={c:<4} {res.tokens_per_s:9.1f} tok/s",
                      flush=True)
    print(f"\nmodel {model_path}; {args.requests} requests per level, prompts ~{args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens; best of {args.rounds} rounds")
    print(f"{'conc':>5} {'off tok/s':>10} {'on tok/s':>10} {'on/off':>7}")
    for c in levels:
        off, on = best[(False, c)], best[(True, c)]
        print(f"{c:>5} {off:>10.1f} {on:>10.1f} {on / off:>7.3f}")
    if tiny_dir is not None:
        shutil.rmtree(tiny_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
