"""GRPO on a fleet: the loop of grpo_cpu, its rollouts sent through sglang-router to servers that Ray placed
(one per CPU slot here, one per GPU with --gpus-per-server 1) and supervises. Needs `pip install .[fleet]`.

    python -m trainer_examples.grpo_fleet --steps 2 --servers 2     # a local Ray cluster on this machine
    python -m trainer_examples.grpo_fleet --ray-address auto --servers 8 --gpus-per-server 1 --spread

Each step's weights go out by one broadcast to every server (world size 1 + N). The group is created for
each push and destroyed after it, so a server the fleet replaced since the last push (it noticed the old
one die) is in the next one; after the push every server's weight version is checked. With
--checkpoint-every K the trainer also saves a checkpoint every K steps and tells the fleet, so a replacement
starts from it rather than from the launch model.
"""

from __future__ import annotations

import os
import time

import torch

from rollout.client.fleet import Fleet
from trainer_examples import grpo


class FleetSync:
    """Every step: a fresh group over the fleet's current servers, one broadcast, the versions checked."""

    def __init__(self, fleet: Fleet, verify: bool = False, checkpoint_dir: str | None = None,
                 checkpoint_every: int = 0):
        self.fleet = fleet
        self.verify = verify
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every
        self.steps = 0

    def prepare(self, model: torch.nn.Module) -> None:
        pass  # separate tensors: save_pretrained (checkpoints) must not see shared storage

    def due(self, step: int) -> bool:
        return True

    def push(self, model: torch.nn.Module, version: str) -> float:
        start = time.monotonic()
        client = self.fleet.client
        group = client.init_weights_update_group("127.0.0.1", backend="gloo")
        try:
            named = [(n, p.detach()) for n, p in model.named_parameters()]
            client.update_weights_from_distributed(group, named, weight_version=version, verify=self.verify)
        finally:
            client.destroy_weights_update_group(group)
        self.fleet.check_versions(version)
        elapsed = time.monotonic() - start
        self.steps += 1
        if self.checkpoint_dir and self.checkpoint_every and self.steps % self.checkpoint_every == 0:
            path = os.path.join(self.checkpoint_dir, version)
            model.save_pretrained(path, safe_serialization=True)
            self.fleet.set_checkpoint(path, version)
        return elapsed

    def close(self) -> None:
        pass


def main(argv: list[str] | None = None) -> None:
    p = grpo.argument_parser("trainer_examples.grpo_fleet", __doc__, default_out="grpo_fleet_out")
    p.add_argument("--servers", type=int, default=2, help="rollout servers in the fleet")
    p.add_argument("--ray-address", default=None, help="a running Ray cluster (default: start a local one)")
    p.add_argument("--gpus-per-server", type=int, default=0, help="1: one server per GPU")
    p.add_argument("--spread", action="store_true", help="one server per node (STRICT_SPREAD)")
    p.add_argument("--policy", default="cache_aware", help="sglang-router's policy")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="save a checkpoint every K steps for replacement servers (0: never)")
    args = p.parse_args(argv)
    server_args = {"model_path": args.model_path, "num_threads": args.server_threads, "device": args.server_device}
    with Fleet.launch(args.servers, server_args, ray_address=args.ray_address, gpus_per_server=args.gpus_per_server,
                      spread=args.spread, policy=args.policy) as fleet:
        print(f"{fleet!r}", flush=True)
        sync = FleetSync(fleet, verify=args.verify, checkpoint_dir=os.path.join(args.out, "checkpoints"),
                         checkpoint_every=args.checkpoint_every)
        logs = grpo.run(args, fleet.client, lambda: sync, "GRPO on a Ray fleet behind sglang-router")
        versions = fleet.check_versions(f"step-{len(logs)}") if logs else {}
        print(f"weight versions: {versions}; fleet events: {fleet.events}", flush=True)


if __name__ == "__main__":
    main()
