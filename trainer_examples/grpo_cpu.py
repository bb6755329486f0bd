"""GRPO on CPU with weights pushed by gloo broadcast after every step.

    python -m trainer_examples.grpo_cpu            # about 6 minutes on 2 cores: mean reward 0.2 -> 1.0
    python -m trainer_examples.grpo_cpu --steps 2  # the CI version
    python -m trainer_examples.grpo_cpu --deterministic  # true on-policy: |dlogp| = 0 exactly every step

Starts one rollout server (SmolLM2-135M-Instruct) beside the trainer, or uses --url.
"""

from __future__ import annotations

import contextlib

import rollout
from trainer_examples import grpo
from trainer_examples.weight_sync import BroadcastSync


def main(argv: list[str] | None = None) -> None:
    p = grpo.argument_parser("trainer_examples.grpo_cpu", __doc__, default_out="grpo_out")
    p.add_argument("--url", default=None, help="use this running server instead of starting one")
    args = p.parse_args(argv)
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(rollout.launch_server(
            args.model_path, num_threads=args.server_threads, device=args.server_device,
            enable_deterministic_inference=args.deterministic)).url
        client = stack.enter_context(rollout.RolloutClient([url]))
        grpo.run(args, client, lambda: BroadcastSync(client, verify=args.verify), "GRPO, broadcast every step")


if __name__ == "__main__":
    main()
