"""A trainer process for in-process Engine broadcast tests: `spawn` `run`, then send it pushes on a queue.

Each push is {"scale", "seed", "order", "load_format", "bucket_bytes", "die_after"} and optionally "source":
the seeded perturbation of the checkpoint (weight_trainer.perturbed, or with "source": "transformers" of a
transformers model's parameters; the test recomputes it with `named_in_order`), sent in
`order` as buckets (load_format "flattened_bucket") or one broadcast per tensor (None). With "die_after": k
it SIGKILLs itself just before its (k+1)-th broadcast, leaving the receiver waiting for data.
"""

from __future__ import annotations

import torch

GROUP_TIMEOUT = 30


def named_in_order(ckpt: str, scale: float, seed: int, order: list[str],
                   source: str = "checkpoint") -> list[tuple[str, torch.Tensor]]:
    """source "checkpoint": the checkpoint's tensors by their names on disk; "transformers": a transformers
    model's parameters by their in-memory names."""
    from weight_trainer import perturbed, perturbed_transformers

    make = perturbed if source == "checkpoint" else perturbed_transformers
    tensors = dict(make(ckpt, scale, seed))
    return [(n, tensors[n]) for n in order]


def run(port: int, group_name: str, ckpt: str, pushes, replies, backend: str = "gloo") -> None:
    """backend "gloo" sends CPU tensors, "nccl" CUDA tensors (the same code path otherwise)."""
    torch.set_num_threads(1)
    from sync import WeightSender, init_custom_process_group, tcp_init_method
    from weight_trainer import _die_before_broadcast

    device = "cuda" if backend == "nccl" else "cpu"
    group = init_custom_process_group(backend, tcp_init_method("127.0.0.1", port), 2, 0, group_name,
                                      timeout=GROUP_TIMEOUT)
    while (push := pushes.get()) is not None:
        if push.get("die_after") is not None:
            _die_before_broadcast(push["die_after"])
        named = named_in_order(ckpt, push["scale"], push["seed"], push["order"], push.get("source", "checkpoint"))
        named = [(n, t.to(device)) for n, t in named]
        sender = WeightSender(group, bucket_bytes=push["bucket_bytes"])
        if push["load_format"] == "flattened_bucket":
            sender.send_buckets(named)
        else:
            sender.send_tensors(named)
        replies.put("sent")
    replies.put("bye")
