"""Two rollout servers updated by one broadcast: the GRPO loop of grpo_cpu over a client of two servers.

    python -m trainer_examples.two_servers --steps 2   # a few minutes on 2 cores

The trainer (rank 0) and both servers (ranks 1, 2) share one gloo group, so each step's weights go out
once and reach both. Prompts spread over the servers (least outstanding requests, a prompt's n samples on
one server); after the run both servers are checked to hold the trainer's weights and version.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import rollout
from rollout import RolloutClient
from trainer_examples import grpo
from trainer_examples.weight_sync import BroadcastSync


def main(argv: list[str] | None = None) -> None:
    p = grpo.argument_parser("trainer_examples.two_servers", __doc__, default_out="two_servers_out")
    args = p.parse_args(argv)
    args.verify = True  # read weights back from both servers after every push
    with contextlib.ExitStack() as stack:
        servers = [rollout.LocalServer(args.model_path, num_threads=args.server_threads, device=args.server_device,
                                       enable_deterministic_inference=args.deterministic).spawn()
                   for _ in range(2)]
        for s in servers:
            stack.callback(s.stop)
        for s in servers:
            s.wait_until_ready()
        client = stack.enter_context(RolloutClient([s.url for s in servers]))
        placed: Counter = Counter()
        original = client.generate

        def generate(*a, **k):  # count where each prompt group ran (the client's balancing at work)
            groups = original(*a, **k)
            placed.update(g[0].server for g in groups)
            return groups

        client.generate = generate  # type: ignore[method-assign]
        logs = grpo.run(args, client, lambda: BroadcastSync(client, verify=True), "GRPO over two servers")
        versions = [i["weight_version"] for i in client.model_info()]
        print(f"prompt groups per server: {dict(placed)}")
        print(f"weight versions: {versions} (expected step-{len(logs)} on both)")
        if versions != [f"step-{len(logs)}"] * 2:
            raise SystemExit("The servers do not report the last pushed version.")


if __name__ == "__main__":
    main()
