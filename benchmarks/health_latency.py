"""`python -m benchmarks.health_latency`: how long /health takes while one big request is being handled.

Issue 11's goal: the front end answers /health within 50 ms while any single request is handled. A server
on the default model (SmolLM2-135M, fp32) is polled from another process (so the client's own work never
delays the poll) every 10 ms while each of these runs alone:

- a weight update carrying the whole model as one tensor payload (~690 MB of JSON),
- the same weights through `RolloutClient.update_weights_from_tensor` (64 MiB buckets),
- a disk update,
- a /tokenize of 10 MB of text (tokenized off the event loop).

Prints, per case, the request's own time and the /health latencies seen meanwhile (p50, p99, max).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from rollout import RolloutClient
from runtime.default_model import default_model_path
from sync import encode_named_tensors, iterate_checkpoint
from tests.helpers import ServerProcess

POLLER = r"""
import json, os, sys, time, requests
url, stop_file = sys.argv[1], sys.argv[2]
lat = []
while not os.path.exists(stop_file):
    t = time.perf_counter()
    requests.get(url + "/health", timeout=120)
    lat.append(time.perf_counter() - t)
    time.sleep(0.01)
print(json.dumps(lat))
"""


def polled(url: str, action) -> tuple[float, list[float]]:
    """Run `action()` while another process polls /health; (its seconds, the poll latencies)."""
    with tempfile.TemporaryDirectory() as tmp:
        stop = Path(tmp) / "stop"
        poller = subprocess.Popen([sys.executable, "-c", POLLER, url, str(stop)], stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        start = time.perf_counter()
        action()
        took = time.perf_counter() - start
        time.sleep(0.5)
        stop.touch()
        out, _ = poller.communicate(timeout=120)
    return took, json.loads(out)


def summary(lat: list[float]) -> str:
    lat = sorted(lat)
    q = lambda p: 1e3 * lat[min(int(p * len(lat)), len(lat) - 1)]  # noqa: E731
    return f"/health n={len(lat)} p50 {q(0.5):.1f} ms, p99 {q(0.99):.1f} ms, max {1e3 * lat[-1]:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None)
    args = parser.parse_args()
    model = args.model_path or default_model_path()
    named = list(iterate_checkpoint(model))
    body = json.dumps({"serialized_named_tensors": [encode_named_tensors(named)]}).encode()
    text = "The quick brown fox jumps over the lazy dog. " * ((10 << 20) // 45)
    flags = ["--model-path", model, "--device", "cpu", "--dtype", "float32", "--log-level", "warning",
             "--max-request-bytes", str(64 << 20)]
    with tempfile.TemporaryDirectory() as tmp, ServerProcess(flags, log_path=str(Path(tmp) / "server.log")) as s:
        client = RolloutClient([s.url])

        def whole_payload() -> None:
            r = requests.post(s.url + "/update_weights_from_tensor", data=body,
                              headers={"Content-Type": "application/json"}, timeout=600)
            assert r.status_code == 200, r.text

        cases = [
            (f"tensor update, whole model in one body ({len(body) >> 20} MiB)", whole_payload),
            ("tensor update through the client, 64 MiB buckets",
             lambda: client.update_weights_from_tensor(named, pause=None)),
            ("disk update", lambda: client.update_weights_from_disk(model, pause=None)),
            ("/tokenize of 10 MB of text",
             lambda: requests.post(s.url + "/tokenize", json={"prompt": text}, timeout=600)),
        ]
        print(f"server: {model}, polled every 10 ms from another process")
        for name, action in cases:
            took, lat = polled(s.url, action)
            print(f"{name:<78} {took:6.2f} s   {summary(lat)}")
        client.close()


if __name__ == "__main__":
    main()
