"""`python -m benchmarks.soak --minutes 30`: a server under the mixed load of an RL run, for a long time.

Launches `python -m rollout.launch_server` (token ids in and out) and drives it from C client threads with
GRPO-shaped work: groups of n samples (`/generate` with n), streams, and requests cancelled mid-flight
(a stream closed after its first chunk, or `/abort_request` by rid), while a trainer thread updates the
weights at the rate a GRPO loop does (every `--update-every` seconds: pause with retract, push new weights
alternately from disk and as a tensor payload with a new `weight_version`, continue).

Prints: requests sent and served, lost (no answer, or a 5xx / unexpected status), duplicated (an rid
answered twice), cancelled, p50 / p99 latency of the non-streaming requests, weight updates applied, and the
resident memory (RSS) of the HTTP and engine processes right after the last update of the warm-up and right
after the last update of the run (the same point of the update cycle), with the change in %, and the highest
RSS seen (sampled every 30 s too).
Goal (issue 11): 0 lost, 0 duplicated, RSS within 2 % of its post-warm-up value.

    python -m benchmarks.soak --tiny --minutes 1      # a smoke run on a tiny random model
    python -m benchmarks.soak --minutes 30            # SmolLM2-135M
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import requests

from sync import encode_named_tensors, iterate_checkpoint
from tests.helpers import ServerProcess, make_tiny_model_dir


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.latencies: list[float] = []
        self.seen: set[str] = set()
        self.errors: list[str] = []

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def answered(self, rids: list[str], latency: float | None) -> None:
        with self.lock:
            for rid in rids:
                if rid in self.seen:
                    self.counts["duplicated"] += 1
                self.seen.add(rid)
            self.counts["served"] += len(rids)
            if latency is not None:
                self.latencies.append(latency)

    def lost(self, n: int, why: str) -> None:
        with self.lock:
            self.counts["lost"] += n
            if len(self.errors) < 10:
                self.errors.append(why[:300])


class Client:
    """One closed-loop client: picks a kind of request, sends it, checks the answer."""

    def __init__(self, url: str, vocab: int, tally: Tally, args: argparse.Namespace, seed: int):
        self.url, self.vocab, self.tally, self.args = url, vocab, tally, args
        self.rng = random.Random(seed)
        self.http = requests.Session()
        self.seq = 0

    def _body(self, n: int) -> tuple[dict, list[str]]:
        self.seq += 1
        rid = f"soak-{id(self)}-{self.seq}"
        prompt = [self.rng.randrange(200, self.vocab) for _ in range(self.rng.randint(8, self.args.prompt_len))]
        params = {"max_new_tokens": self.rng.randint(4, self.args.new_tokens), "temperature": 1.0, "n": n}
        body = {"input_ids": prompt, "sampling_params": params}
        if n == 1:
            body["rid"] = rid
        return body, [rid]

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            kind = self.rng.choices(["group", "stream", "cancel_stream", "abort"], [6, 2, 1, 1])[0]
            try:
                getattr(self, kind)()
            except requests.RequestException as e:
                self.tally.lost(1, f"{kind}: {e!r}")

    def group(self) -> None:
        body, _ = self._body(self.args.n)
        self.tally.add("sent", self.args.n)
        start = time.monotonic()
        r = self.http.post(self.url + "/generate", json=body, timeout=300)
        if r.status_code != 200:
            return self.tally.lost(self.args.n, f"group: {r.status_code} {r.text}")
        out = r.json()
        out = out if isinstance(out, list) else [out]
        if len(out) != self.args.n:
            return self.tally.lost(self.args.n, f"group: {len(out)} answers for n={self.args.n}")
        self.tally.answered([o["meta_info"]["id"] for o in out], time.monotonic() - start)

    def stream(self) -> None:
        body, rids = self._body(1)
        self.tally.add("sent")
        with self.http.post(self.url + "/generate", json={**body, "stream": True}, stream=True, timeout=300) as r:
            if r.status_code != 200:
                return self.tally.lost(1, f"stream: {r.status_code} {r.text}")
            last = None
            for line in r.iter_lines():
                if line.startswith(b"data: ") and line != b"data: [DONE]":
                    last = json.loads(line[6:])
            if last is None or "error" in last or not last["meta_info"]["finish_reason"]:
                return self.tally.lost(1, f"stream ended without a finished chunk: {last}")
        self.tally.answered(rids, None)

    def cancel_stream(self) -> None:
        body, _ = self._body(1)
        body["sampling_params"]["max_new_tokens"] = self.args.new_tokens * 4
        self.tally.add("sent")
        with self.http.post(self.url + "/generate", json={**body, "stream": True}, stream=True, timeout=300) as r:
            next(r.iter_lines(), None)  # then hang up mid-stream
        self.tally.add("cancelled")

    def abort(self) -> None:
        body, rids = self._body(1)
        body["sampling_params"]["max_new_tokens"] = self.args.new_tokens * 4
        self.tally.add("sent")
        box: dict = {}
        t = threading.Thread(target=lambda: box.setdefault("r", self.http.post(self.url + "/generate", json=body,
                                                                               timeout=300)))
        t.start()
        time.sleep(self.rng.uniform(0.0, 0.2))
        requests.post(self.url + "/abort_request", json={"rid": rids[0]}, timeout=60)
        t.join()
        r = box.get("r")
        if r is None or r.status_code != 200:
            return self.tally.lost(1, f"abort: {getattr(r, 'status_code', None)} {getattr(r, 'text', '')}")
        self.tally.answered(rids, None)
        self.tally.add("cancelled")


def trainer(url: str, ckpts: list[str], every: float, stop: threading.Event, tally: Tally,
            settled: list[tuple[float, float, float]], sample: Callable[[], tuple[float, float]]) -> None:
    """A GRPO trainer's weight pushes: pause (retract), update, continue, every `every` seconds. After each
    update both processes' RSS is appended to `settled` (time, http, engine): the same point of the cycle
    every time, so a rise between two of them is memory kept, not one update's transient buffers."""
    payloads = [encode_named_tensors(list(iterate_checkpoint(c))) for c in ckpts]
    k = 0
    while not stop.wait(every):
        k += 1
        try:
            assert requests.post(url + "/pause_generation", json={"mode": "retract"}, timeout=300).ok
            if k % 2:
                r = requests.post(url + "/update_weights_from_disk", timeout=600,
                                  json={"model_path": ckpts[k % len(ckpts)], "weight_version": f"step-{k}"})
            else:
                r = requests.post(url + "/update_weights_from_tensor", timeout=600, json={
                    "serialized_named_tensors": [payloads[k % len(ckpts)]], "weight_version": f"step-{k}"})
            assert requests.post(url + "/continue_generation", json={}, timeout=300).ok
            tally.add("updates" if r.status_code == 200 else "updates_failed")
            settled.append((time.monotonic(), *sample()))
        except (requests.RequestException, AssertionError) as e:
            tally.add("updates_failed")
            tally.lost(0, f"update: {e!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--warmup-s", type=float, default=20.0, help="at least; and until 4 updates have run")
    parser.add_argument("--tiny", action="store_true", help="a small random model (checks the script)")
    parser.add_argument("--model-path", help="HF checkpoint directory (default: the embedded SmolLM2)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--n", type=int, default=4, help="samples per group request")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--update-every", type=float, default=10.0, help="seconds between weight updates")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    if args.tiny:
        model = make_tiny_model_dir(Path(tmp.name) / "a", hidden_size=64, num_layers=2)
        other = make_tiny_model_dir(Path(tmp.name) / "b", hidden_size=64, num_layers=2, seed=1)
    else:
        from runtime.default_model import default_model_path
        model = args.model_path or default_model_path()
        other = str(Path(tmp.name) / "copy")
        shutil.copytree(model, other)
    flags = ["--model-path", model, "--device", "cpu", "--dtype", "float32", "--skip-tokenizer-init",
             "--log-level", "warning"]
    tally = Tally()
    with ServerProcess(flags, log_path=str(Path(tmp.name) / "server.log")) as server:
        info = server.get("/get_server_info").json()
        vocab, engine_pid = info["vocab_size"], info["internal_states"][0]["engine_pid"]
        stop = threading.Event()
        clients = [Client(server.url, vocab, tally, args, seed=i) for i in range(args.clients)]
        threads = [threading.Thread(target=c.run, args=(stop,), daemon=True) for c in clients]
        settled: list[tuple[float, float, float]] = []
        sample = lambda: (rss_mib(server.proc.pid), rss_mib(engine_pid))  # noqa: E731
        threads.append(threading.Thread(target=trainer, args=(server.url, [model, other], args.update_every, stop,
                                                              tally, settled, sample), daemon=True))
        for t in threads:
            t.start()
        # Warm-up lasts until each kind of update has run twice: the first ones set each process's high-water
        # mark (the disk reader's scratch buffer is kept on purpose), which glibc keeps.
        began = time.monotonic()
        while (time.monotonic() - began < args.warmup_s or len(settled) < 4) and time.monotonic() - began < 600:
            time.sleep(1.0)
        warmup_s = time.monotonic() - began
        mark = len(settled)
        start_counts = Counter(tally.counts)
        samples = [sample()]
        end = began + max(args.minutes * 60, warmup_s + 1.0)
        while time.monotonic() < end:
            time.sleep(min(30.0, max(end - time.monotonic(), 0.0)))
            samples.append(sample())
        stop.set()
        for t in threads:
            t.join(600)
        after = settled[max(mark - 1, 0):] or [(0.0, *samples[0]), (0.0, *samples[-1])]
        rss0, rss1 = after[0][1:], after[-1][1:]
        series = [(round(t - began), round(h), round(e)) for t, h, e in after]
        samples += [x[1:] for x in after]
        stop.set()
        for t in threads:
            t.join(600)
        health = server.get("/health").status_code
        state = server.get("/get_server_info").json()["internal_states"][0]
    tmp.cleanup()
    lat = sorted(tally.latencies)
    p = lambda q: lat[min(int(q * len(lat)), len(lat) - 1)] if lat else float("nan")  # noqa: E731
    result = {
        "minutes": args.minutes, "sent": tally.counts["sent"], "served": tally.counts["served"],
        "lost": tally.counts["lost"], "duplicated": tally.counts["duplicated"],
        "cancelled": tally.counts["cancelled"], "updates": tally.counts["updates"],
        "updates_failed": tally.counts["updates_failed"], "p50_s": p(0.5), "p99_s": p(0.99),
        "rss_http_mib": rss0[0], "rss_http_end_mib": rss1[0], "rss_engine_mib": rss0[1], "rss_engine_end_mib": rss1[1],
        "rss_http_change_pct": 100 * (rss1[0] - rss0[0]) / rss0[0],
        "rss_engine_change_pct": 100 * (rss1[1] - rss0[1]) / rss0[1],
        "served_after_warmup": tally.counts["served"] - start_counts["served"],
        "rss_http_max_mib": max(x[0] for x in samples), "rss_engine_max_mib": max(x[1] for x in samples),
        "warmup_s": warmup_s, "rss_after_each_update": series,
        "health_at_end": health, "idle_clean_at_end": state.get("idle_clean"), "errors": tally.errors,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"soak {args.minutes:g} min, {args.clients} clients, n={args.n}, an update every {args.update_every:g} s")
    print(f"requests  sent {result['sent']}  served {result['served']}  lost {result['lost']}  duplicated "
          f"{result['duplicated']}  cancelled {result['cancelled']}  (goal: 0 lost, 0 duplicated)")
    print(f"latency   p50 {result['p50_s']:.3f} s  p99 {result['p99_s']:.3f} s (group requests of n={args.n})")
    print(f"updates   {result['updates']} applied, {result['updates_failed']} failed")
    print(f"RSS MiB   http {rss0[0]:.1f} -> {rss1[0]:.1f} ({result['rss_http_change_pct']:+.2f} %)  engine "
          f"{rss0[1]:.1f} -> {rss1[1]:.1f} ({result['rss_engine_change_pct']:+.2f} %)  (goal: within 2 %); "
          f"highest sampled (every 30 s): http {result['rss_http_max_mib']:.1f}, engine "
          f"{result['rss_engine_max_mib']:.1f}; warm-up {warmup_s:g} s")
    step = max(1, len(series) // 12)
    print("RSS after updates (s, http MiB, engine MiB): " + "  ".join(f"{t}:{h}/{e}" for t, h, e in series[::step]))
    print(f"end       /health {health}, idle_clean {result['idle_clean_at_end']}")
    for e in tally.errors:
        print("  error:", e)


if __name__ == "__main__":
    main()
