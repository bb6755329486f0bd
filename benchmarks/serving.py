"""`python -m benchmarks.serving`: the HTTP server beside the in-process Engine, on the same work.

Launches `python -m rollout.launch_server` (token ids in and out: --skip-tokenizer-init; or --url for a
server already running, which should then be idle and alone on the machine), sweeps the
client concurrency (closed loop: each of C clients sends its next request when the previous one is
answered), then stops it and runs the same requests through an in-process `runtime.Engine` from C
threads. Prints, per concurrency: output tokens/s, requests/s, latency p50/p90/p99, and the ratio
server / engine; then the added latency of a one-token request (server p50 - engine p50, sequential).

Small defaults (a few minutes on a 2-core CPU for SmolLM2, under a minute with --tiny); the numbers only mean something on a quiet
machine. `--tiny` benchmarks a tiny random model instead (front-end overhead dominates there).

    python -m benchmarks.serving                                  # SmolLM2-135M, concurrency 1,8,64
    python -m benchmarks.serving --concurrency 1,16,64,128 --requests-per-level 256 --new-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import shutil
import statistics
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import requests
import torch

import rollout
from tests.helpers import make_tiny_model_dir


@dataclass
class LevelResult:
    system: str
    concurrency: int
    requests: int
    output_tokens: int
    seconds: float
    latencies: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    def pct(self, q: float) -> float:
        return percentile(self.latencies, q)


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def make_prompts(count: int, prompt_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(max(prompt_len - 8, 1), prompt_len + 9, (count,), generator=g)
    return [torch.randint(200, vocab_size, (int(n),), generator=g).tolist() for n in lens]


# --- a minimal HTTP/1.1 client on asyncio streams (keep-alive, Content-Length answers) --------------


class HttpConnection:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post_json(self, path: str, body: dict) -> dict:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        payload = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        await self.writer.drain()
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        data = await self.reader.readexactly(length)
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {data[:500]!r}")
        return json.loads(data)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def _server_level(host: str, port: int, prompts: list[list[int]], params: dict,
                        concurrency: int) -> LevelResult:
    queue = list(enumerate(prompts))
    latencies: list[float] = []
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        conn = HttpConnection(host, port)
        try:
            while queue:
                _, prompt = queue.pop()
                t = time.perf_counter()
                out = await conn.post_json("/generate", {"input_ids": prompt, "sampling_params": params})
                latencies.append(time.perf_counter() - t)
                tokens += len(out["output_ids"])
        finally:
            conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    return LevelResult("server", concurrency, len(prompts), tokens, seconds, latencies)


def _engine_level(engine, prompts: list[list[int]], params: dict, concurrency: int) -> LevelResult:
    queue = list(enumerate(prompts))
    lock = threading.Lock()
    latencies: list[float] = []
    tokens = [0]

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                _, prompt = queue.pop()
            t = time.perf_counter()
            out = engine.generate(input_ids=prompt, sampling_params=params)
            dt = time.perf_counter() - t
            with lock:
                latencies.append(dt)
                tokens[0] += len(out["output_ids"])

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    seconds = time.perf_counter() - start
    return LevelResult("engine", concurrency, len(prompts), tokens[0], seconds, latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (front-end overhead dominates)")
    parser.add_argument("--url", default=None, help="a running server (e.g. http://127.0.0.1:30000) instead of "
                        "launching one; its model runs in the in-process Engine afterwards")
    parser.add_argument("--concurrency", default="1,8,64", help="comma-separated client concurrency levels")
    parser.add_argument("--requests-per-level", type=int, default=0,
                        help="requests per level (default: max(16, 2 x concurrency))")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--latency-samples", type=int, default=50, help="sequential one-token requests")
    parser.add_argument("--max-total-tokens", type=int, default=60000)
    parser.add_argument("--num-threads", type=int, default=None, help="torch threads of each engine")
    parser.add_argument("--skip-engine", action="store_true", help="server only")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    tiny_dir = None
    if args.url and args.model_path is None:  # the engine side runs the model the server runs
        args.model_path = requests.get(args.url.rstrip("/") + "/get_model_info", timeout=60).json()["model_path"]
    if args.tiny:
        tiny_dir = tempfile.mkdtemp(prefix="bench-tiny-")
        args.model_path = make_tiny_model_dir(tiny_dir)
    elif args.model_path is None:
        from runtime.default_model import default_model_path
        args.model_path = default_model_path()
    levels = [int(c) for c in args.concurrency.split(",")]
    from transformers import AutoConfig
    vocab = AutoConfig.from_pretrained(args.model_path).vocab_size
    work = {c: make_prompts(args.requests_per_level or max(16, 2 * c), args.prompt_len, vocab, seed=c) for c in levels}
    one_token = make_prompts(args.latency_samples, 8, vocab, seed=10_000)
    params = {"max_new_tokens": args.new_tokens, "ignore_eos": True, "temperature": 1.0}
    one_params = {"max_new_tokens": 1, "temperature": 0.0}
    warm = make_prompts(8, args.prompt_len, vocab, seed=99)

    results: list[LevelResult] = []
    # Server first, then the in-process engine: never both at once on the same cores.
    if args.url:
        launched = contextlib.nullcontext()
        host, port = urllib.parse.urlsplit(args.url).hostname, urllib.parse.urlsplit(args.url).port or 80
    else:
        launched = rollout.LocalServer(args.model_path, skip_tokenizer_init=True, log_level="warning",
                                       max_total_tokens=args.max_total_tokens, num_threads=args.num_threads)
    with launched as server:
        if server is not None:
            host, port = "127.0.0.1", server.port

        async def run_server() -> tuple[list[LevelResult], list[float]]:
            await _server_level(host, port, warm, params, 4)
            out = []
            for c in levels:
                out.append(await _server_level(host, port, work[c], params, c))
                print(f"server  c={c:<4} {out[-1].tokens_per_s:9.1f} tok/s", flush=True)
            conn = HttpConnection(host, port)
            lat = []
            for p in one_token:
                t = time.perf_counter()
                await conn.post_json("/generate", {"input_ids": p, "sampling_params": one_params})
                lat.append(time.perf_counter() - t)
            conn.close()
            return out, lat

        server_results, server_one = asyncio.run(run_server())
        results += server_results

    engine_one: list[float] = []
    if not args.skip_engine:
        from runtime.engine import Engine
        engine = Engine(args.model_path, skip_tokenizer_init=True, progress=False,
                        max_total_tokens=args.max_total_tokens, num_threads=args.num_threads)
        _engine_level(engine, warm, params, 4)
        for c in levels:
            results.append(_engine_level(engine, work[c], params, c))
            print(f"engine  c={c:<4} {results[-1].tokens_per_s:9.1f} tok/s", flush=True)
        for p in one_token:
            t = time.perf_counter()
            engine.generate(input_ids=p, sampling_params=one_params)
            engine_one.append(time.perf_counter() - t)
        engine.shutdown()

    print(f"\nmodel {args.model_path}; prompts ~{args.prompt_len} tokens, {args.new_tokens} new tokens each, T=1; "
          f"torch threads per engine: {args.num_threads or torch.get_num_threads()}")
    print(f"{'system':<8} {'conc':>5} {'reqs':>5} {'tok/s':>9} {'req/s':>8} {'p50 s':>8} {'p90 s':>8} {'p99 s':>8}"
          f" {'server/engine':>14}")
    for r in results:
        ratio = ""
        if r.system == "server":
            eng = next((e for e in results if e.system == "engine" and e.concurrency == r.concurrency), None)
            if eng is not None:
                ratio = f"{r.tokens_per_s / eng.tokens_per_s:.2f}"
        print(f"{r.system:<8} {r.concurrency:>5} {r.requests:>5} {r.tokens_per_s:>9.1f} {r.requests_per_s:>8.2f} "
              f"{r.pct(50):>8.3f} {r.pct(90):>8.3f} {r.pct(99):>8.3f} {ratio:>14}")
    s50 = statistics.median(server_one) * 1000
    line = f"\none-token request, sequential, {len(server_one)} samples: server p50 {s50:.2f} ms"
    if engine_one:
        e50 = statistics.median(engine_one) * 1000
        line += f", engine p50 {e50:.2f} ms, added latency p50 {s50 - e50:.2f} ms"
    print(line)
    if tiny_dir is not None:
        shutil.rmtree(tiny_dir, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"levels": [asdict(r) | {"tokens_per_s": r.tokens_per_s} for r in results],
                       "one_token_server_s": server_one, "one_token_engine_s": engine_one}, f, indent=1)


if __name__ == "__main__":
    main()
