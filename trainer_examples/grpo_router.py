"""GRPO behind sglang-router: the loop of grpo_cpu, its rollouts sent through SGLang's router to two servers.

    python -m trainer_examples.grpo_router --steps 2   # a few minutes on 2 cores; needs sglang-router

The client is given only the router (`RolloutClient.from_router`): generation goes through it (its
cache_aware policy places each prompt group), and the client reads the workers from the router's /workers
for what the router does not forward: each step's weights go out by one gloo broadcast to both workers
(ranks 1 and 2), with pause and verification on each. Or use --router with a running router.
"""

from __future__ import annotations

import contextlib

import rollout
from rollout import LocalRouter, RolloutClient
from trainer_examples import grpo
from trainer_examples.weight_sync import BroadcastSync


def main(argv: list[str] | None = None) -> None:
    p = grpo.argument_parser("trainer_examples.grpo_router", __doc__, default_out="grpo_router_out")
    p.add_argument("--router", default=None, help="use this running sglang-router instead of starting two servers "
                                                  "and one")
    p.add_argument("--policy", default="cache_aware", help="the router's policy when this example starts it")
    args = p.parse_args(argv)
    with contextlib.ExitStack() as stack:
        router_url = args.router
        if router_url is None:
            servers = [rollout.LocalServer(args.model_path, num_threads=args.server_threads,
                                           device=args.server_device).spawn() for _ in range(2)]
            for s in servers:
                stack.callback(s.stop)
            for s in servers:
                s.wait_until_ready()
            router_url = stack.enter_context(LocalRouter([s.url for s in servers], policy=args.policy).start()).url
        client = stack.enter_context(RolloutClient.from_router(router_url))
        print(f"router {client.router_urls[0]} in front of {client.urls}", flush=True)
        logs = grpo.run(args, client, lambda: BroadcastSync(client, verify=args.verify), "GRPO behind sglang-router")
        versions = [i["weight_version"] for i in client.model_info()]
        print(f"weight versions: {versions} (expected step-{len(logs)} on every worker)")
        if versions != [f"step-{len(logs)}"] * len(versions):
            raise SystemExit("The workers do not report the last pushed version.")


if __name__ == "__main__":
    main()
