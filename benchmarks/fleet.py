"""A fleet of single-thread CPU servers on a local Ray cluster, behind sglang-router, in one run:
`python -m benchmarks.fleet` (needs `pip install .[fleet]`).

- throughput: the GRPO-shaped workload (prompts x n samples, temperature 1) through a router in front of
  N = 1, 2, 3 of the fleet's servers; scaling efficiency = tokens/s at N over N x tokens/s at 1 (goal
  >= 0.85 per added server where cores allow: on a 2-core machine the third server has no core of its own).
- failure: a server SIGKILLed under load: seconds until the monitor notices, and until the replacement
  serves behind the router again.
- update: one broadcast of every weight to the N servers (group created, bucketed push, versions checked,
  group destroyed) vs one raw flat `dist.broadcast` of the same bytes from the trainer to N plain processes.

Defaults to SmolLM2-135M (fp32); `--tiny` runs a small random model to check the script works.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import tempfile
import time

import torch

from rollout import LocalRouter, RolloutClient
from rollout.client.fleet import Fleet
from rollout.client.local_server import free_port


def throughput(router_url: str, workers: list[str], prompts: list[str], n: int, new_tokens: int) -> float:
    with RolloutClient(router_url, workers=workers) as client:
        client.generate(prompts[:2], {"max_new_tokens": 2})  # warm-up
        start = time.monotonic()
        groups = client.generate(prompts, {"max_new_tokens": new_tokens, "temperature": 1.0, "ignore_eos": True}, n=n)
        elapsed = time.monotonic() - start
    return sum(len(r.output_ids) for g in groups for r in g) / elapsed


def _receiver(port: int, rank: int, world: int, numel: int) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    buf = torch.empty(numel)
    dist.barrier()
    dist.broadcast(buf, 0)
    dist.barrier()
    dist.destroy_process_group()


def raw_broadcast(numel: int, receivers: int) -> float:
    """Seconds for one flat gloo broadcast of `numel` floats to `receivers` plain processes."""
    import torch.distributed as dist
    port = free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_receiver, args=(port, r, receivers + 1, numel)) for r in range(1, receivers + 1)]
    for p in procs:
        p.start()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=receivers + 1)
    buf = torch.randn(numel)
    dist.barrier()
    start = time.monotonic()
    dist.broadcast(buf, 0)
    dist.barrier()
    elapsed = time.monotonic() - start
    dist.destroy_process_group()
    for p in procs:
        p.join(60)
    return elapsed


def fleet_update(fleet: Fleet, model: torch.nn.Module, version: str) -> float:
    start = time.monotonic()
    group = fleet.client.init_weights_update_group(backend="gloo")
    try:
        fleet.client.update_weights_from_distributed(group, [(n, p.detach()) for n, p in model.named_parameters()],
                                                     weight_version=version)
    finally:
        fleet.client.destroy_weights_update_group(group)
    fleet.check_versions(version)
    return time.monotonic() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", type=int, default=3)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--tiny", action="store_true", help="a small random model (checks the script)")
    args = p.parse_args()
    torch.set_num_threads(1)
    model_path = None
    if args.tiny:
        from tests.helpers import make_tiny_model_dir
        model_path = make_tiny_model_dir(tempfile.mkdtemp(prefix="bench-fleet-"), context_length=1024)
    server_args = {"model_path": model_path, "device": "cpu", "dtype": "float32", "num_threads": 1,
                   "log_level": "warning"}
    prompts = [f"Question {i}: what is {i} plus {3 * i}? Answer briefly." for i in range(args.prompts)]
    results: dict[str, object] = {}
    with Fleet.launch(args.servers, server_args) as fleet:
        workers = fleet.workers
        tput: dict[int, float] = {}
        for n in range(1, args.servers + 1):
            if n == args.servers:
                tput[n] = throughput(fleet.router_url, workers, prompts, args.n, args.max_new_tokens)
            else:
                with LocalRouter(workers[:n]).start() as router:
                    tput[n] = throughput(router.url, workers[:n], prompts, args.n, args.max_new_tokens)
        results["tokens_per_s"] = tput
        results["scaling_efficiency"] = {n: tput[n] / (n * tput[1]) for n in tput}

        from transformers import AutoModelForCausalLM
        path = model_path or fleet.client.model_info()[0]["model_path"]
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        numel = sum(t.numel() for t in model.parameters())
        ours = min(fleet_update(fleet, model, f"bench-{i}") for i in range(2))
        raw = min(raw_broadcast(numel, args.servers) for _ in range(2))
        results.update(update_s=ours, raw_broadcast_s=raw, update_ratio=ours / raw, update_mb=numel * 4 / 1e6)

        victim = fleet.server_pids()[-1]
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        dead = fleet.wait_for("dead", timeout=60)[0]
        replaced = fleet.wait_for("replaced", timeout=600)[0]
        results.update(detect_s=dead.at - killed, replace_s=replaced.at - killed)
    print(json.dumps(results))
    for n, t in tput.items():
        print(f"N={n}: {t:8.1f} tokens/s through the router   efficiency {results['scaling_efficiency'][n]:.2f} "
              f"(goal >= 0.85 where each server has a core; {os.cpu_count()} cores here)")
    print(f"update to {args.servers} servers {ours:7.3f} s   raw flat broadcast {raw:7.3f} s   ratio {ours / raw:5.2f} "
          f"({results['update_mb']:.1f} MB)")
    print(f"dead server noticed after {results['detect_s']:.2f} s, replacement serving after {results['replace_s']:.2f} s")


if __name__ == "__main__":
    main()
