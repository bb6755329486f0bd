"""The GRPO loop of grpo_cpu, syncing through checkpoints on disk every k steps instead of a broadcast.

    python -m trainer_examples.grpo_disk --every 2            # rollouts are up to one step stale
    python -m trainer_examples.grpo_disk --steps 2 --every 1  # the CI version

Between syncs the server samples from older weights: the logged |dlogp| mismatch grows, and the
importance ratio against the rollout logprobs keeps the update correct.
"""

from __future__ import annotations

import contextlib
import tempfile

import rollout
from trainer_examples import grpo
from trainer_examples.weight_sync import DiskSync


def main(argv: list[str] | None = None) -> None:
    p = grpo.argument_parser("trainer_examples.grpo_disk", __doc__, default_out="grpo_disk_out")
    p.add_argument("--every", type=int, default=2, help="sync every k steps")
    p.add_argument("--url", default=None, help="use this running server instead of starting one")
    args = p.parse_args(argv)
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(rollout.launch_server(
            args.model_path, num_threads=args.server_threads, device=args.server_device,
            enable_deterministic_inference=args.deterministic)).url
        client = stack.enter_context(rollout.RolloutClient([url]))
        ckpts = stack.enter_context(tempfile.TemporaryDirectory(prefix="grpo-ckpt-"))
        grpo.run(args, client, lambda: DiskSync(client, ckpts, args.every, verify=args.verify),
                 f"GRPO, disk sync every {args.every} steps")


if __name__ == "__main__":
    main()
