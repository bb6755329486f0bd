"""A trainer process for the server weight-update tests: `python tests/weight_trainer.py '<json>'`.

It joins the servers' weight-update group through rollout.RolloutClient (the public trainer API) and pushes
seeded perturbations of a checkpoint (`perturbed()`, which the test recomputes to check the result). Between
updates it prints "done <i>" and waits for a line on stdin, so the test can check each update. With "kill":
{"update": i, "after": k} it SIGKILLs itself just before its (k+1)-th broadcast of update i: a trainer dying
mid-update, with the servers waiting for data. Imports stay light (no transformers) so it starts fast.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch

torch.set_num_threads(1)


def perturbed(ckpt: str, scale: float, seed: int) -> list[tuple[str, torch.Tensor]]:
    from sync import iterate_checkpoint

    gen = torch.Generator().manual_seed(seed)
    return [(n, t + scale * torch.randn(t.shape, generator=gen)) for n, t in iterate_checkpoint(ckpt)]


def perturbed_transformers(ckpt: str, scale: float, seed: int) -> list[tuple[str, torch.Tensor]]:
    """The same kind of perturbation of a transformers model's own `named_parameters()` (its in-memory names:
    for MoE models in transformers v5, each layer's experts as two stacked tensors)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    return [(n, p.detach() + scale * torch.randn(p.shape, generator=gen)) for n, p in model.named_parameters()]


def hf_greedy(model_dir: str, prompt: list[int], n: int, named: list | None = None) -> list[int]:
    """transformers' greedy continuation, on the checkpoint or on `named` tensors loaded over it (for tests)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if named is not None:
        result = model.load_state_dict(dict(named), strict=False)
        assert not result.unexpected_keys, result.unexpected_keys
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


def _die_before_broadcast(after: int) -> None:
    import sync.sender

    real = sync.sender.broadcast
    count = 0

    def broadcast(*args, **kwargs):
        nonlocal count
        if count == after:
            time.sleep(0.5)  # the announcement (an HTTP POST on a worker thread) reaches the servers first
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        count += 1
        return real(*args, **kwargs)

    sync.sender.broadcast = broadcast


def main(cfg: dict) -> None:
    from rollout import RolloutClient

    client = RolloutClient(cfg["urls"])
    group = client.init_weights_update_group("127.0.0.1", cfg["port"], backend="gloo", timeout=cfg.get("timeout", 30))
    print("joined", flush=True)
    kill = cfg.get("kill")
    for i, u in enumerate(cfg["updates"]):
        sys.stdin.readline()  # the test's go-ahead
        if kill and kill["update"] == i:
            _die_before_broadcast(kill["after"])
        named = perturbed(cfg["ckpt"], u["scale"], u["seed"])
        try:
            # pause=None: the test drives the servers itself (a trainer killed mid-push never continues them)
            client.update_weights_from_distributed(group, named, weight_version=u.get("version"), pause=None,
                                                   load_format=u.get("load_format", "flattened_bucket"),
                                                   bucket_bytes=cfg.get("bucket_bytes", 40_000))
            print(f"done {i}", flush=True)
        except Exception as e:
            print(f"failed {i} {json.dumps(str(e))}", flush=True)
    sys.stdin.readline()
    client.destroy_weights_update_group(group)
    client.close()
    print("destroyed", flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
