"""`Fleet`: many rollout servers placed by Ray (one per GPU or CPU slot, across the nodes of a Ray cluster),
sglang-router in front of them, a monitor that replaces a server that died. Needs `pip install .[fleet]`
(ray); nothing else in rollout imports this module.

    fleet = Fleet.launch(3, {"model_path": path, "device": "cpu", "dtype": "float32", "num_threads": 1})
    groups = fleet.client.generate(prompts, params)          # through the router
    group = fleet.client.init_weights_update_group()         # world size 1 + 3
    fleet.client.update_weights_from_distributed(group, model.named_parameters(), weight_version="v1")
    fleet.client.destroy_weights_update_group(group)
    fleet.check_versions("v1")
    fleet.shutdown()

A server whose process died is restarted by its actor on the same port, so its URL stays. A lost actor (its
process killed, its node gone) took its server with it (ServerActor); a new actor takes its placement-group
bundle, at a new port (or node): the fleet swaps the URL in the router and, in place, in `fleet.client`
(`replace_worker`), so the client object a trainer holds stays valid. A replacement loads the latest
checkpoint the fleet knows (`set_checkpoint`; at first the launch model) and does not hold the broadcast
weights of later updates: create the weight update group for each update (as above), so the next update
includes it and brings it up to date. A group kept across a death fails on its next broadcast (the dead
rank is gone): destroy it and create a new one.
Generation requests in flight on a server that died: the router the fleet starts resends nothing itself
(ROUTER_FLAGS) and answers them with a 5xx; the client resends each once through the router to a live
worker (RetryPolicy.retry_server_error, on by default here). At most once: a request may so run twice on
the servers, its answer reaches the caller once, and a request lost twice reaches the caller as that 5xx
(ServerError). `fleet.client.resends` counts the resends. A router given by URL keeps its own retries.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import requests

from rollout.client.errors import WeightUpdateError
from rollout.client.local_router import LocalRouter
from rollout.client.results import ServerReply
from rollout.client.retry_policy import RetryPolicy
from rollout.client.rollout_client import RolloutClient
from rollout.client.router_admin import add_worker, remove_worker
from rollout.client.server_actor import ServerActor

HEALTH_FAILURES = 3  # consecutive failed /health polls (process still up) before a server counts as dead
# The router resends nothing itself (the client resends a lost request once: RetryPolicy), and one failure
# (a worker gone mid-request) keeps it off that worker for a moment, so that resend lands on a live one
# before the monitor has taken the dead one out.
ROUTER_FLAGS = ("--disable-retries", "--cb-failure-threshold", "1", "--cb-timeout-duration-secs", "2")


@dataclass
class FleetEvent:
    """What the monitor saw and did: kind is "dead", "replaced" or "replace_failed"."""
    kind: str
    slot: int
    url: str
    at: float  # time.monotonic()
    detail: str = ""


class Fleet:
    def __init__(self, actors: list[Any], urls: list[str], placement_group: Any, server_args: dict[str, Any],
                 router: LocalRouter | None, router_url: str, client: RolloutClient, owns_ray: bool,
                 poll_s: float, actor_cls: Any, strategy_for: Any):
        self.actors = actors
        self.urls = urls
        self.placement_group = placement_group
        self.server_args = dict(server_args)
        self.router = router
        self.router_url = router_url
        self.client = client
        self.events: list[FleetEvent] = []
        self.poll_s = poll_s
        self._owns_ray = owns_ray
        self._actor_cls = actor_cls
        self._strategy_for = strategy_for
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._failures = [0] * len(urls)
        self._monitor = threading.Thread(target=self._watch, name="fleet-monitor", daemon=True)
        self._monitor.start()

    # --- launch ---------------------------------------------------------------------------------

    @classmethod
    def launch(cls, num_servers: int, server_args: dict[str, Any], *, ray_address: str | None = None,
               router: bool | str = True, gpus_per_server: int = 0, spread: bool = False,
               policy: str = "cache_aware", num_cpus: int | None = None, poll_s: float = 1.0,
               timeout: float = 600.0, retry: RetryPolicy = RetryPolicy(retry_server_error=True),
               **client_options: Any) -> "Fleet":
        """Place `num_servers` servers (LocalServer keywords in `server_args`, `model_path` included) in one
        Ray placement group: bundles of one GPU (`gpus_per_server=1`) or one CPU slot, PACK, or
        STRICT_SPREAD over nodes (`spread`). `ray_address` None starts a local cluster (`num_cpus` logical
        CPUs, default num_servers + 1). `router`: True starts sglang-router (LocalRouter, `policy`), a URL
        uses that router (the fleet adds its servers to it), False generates through the servers with the
        client's own balancer."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        owns_ray = not ray.is_initialized()
        if owns_ray:
            if ray_address is None:
                ray.init(num_cpus=num_cpus or num_servers + 1, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=ray_address, log_to_driver=False)
        bundle = {"GPU": gpus_per_server, "CPU": 1} if gpus_per_server else {"CPU": 1}
        pg = placement_group([dict(bundle)] * num_servers, strategy="STRICT_SPREAD" if spread else "PACK")
        actors: list[Any] = []
        local_router: LocalRouter | None = None
        try:
            ray.get(pg.ready(), timeout=timeout)
            actor_cls = ray.remote(ServerActor)

            def strategy_for(slot: int) -> dict[str, Any]:
                return {"num_cpus": 1, "num_gpus": gpus_per_server, "max_concurrency": 4,
                        "scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=slot)}

            actors = [actor_cls.options(**strategy_for(i)).remote() for i in range(num_servers)]
            urls = ray.get([a.start.remote(server_args, timeout) for a in actors], timeout=timeout + 60)
            if router is True:
                local_router = LocalRouter(urls, policy=policy, flags=ROUTER_FLAGS).start(timeout)
                router_url = local_router.url
            elif isinstance(router, str):
                router_url = router.rstrip("/")
                for u in urls:
                    add_worker(router_url, u, api_key=server_args.get("api_key"))
            else:
                router_url = ""
            options = {"api_key": server_args.get("api_key"), "retry": retry, **client_options}
            client = (RolloutClient(router_url, workers=urls, **options) if router_url
                      else RolloutClient(urls, **options))
        except BaseException:
            _stop_actors(actors)
            if local_router is not None:
                local_router.stop()
            ray.util.remove_placement_group(pg)
            if owns_ray:
                ray.shutdown()
            raise
        return cls(actors, urls, pg, server_args, local_router, router_url, client, owns_ray, poll_s, actor_cls,
                   strategy_for)

    # --- what the trainer calls -----------------------------------------------------------------

    @property
    def workers(self) -> list[str]:
        return list(self.urls)

    def set_checkpoint(self, model_path: str, weight_version: str | None = None) -> None:
        """The checkpoint a replacement server loads (and the weight version it then reports)."""
        with self._lock:
            self.server_args["model_path"] = model_path
            if weight_version is not None:
                self.server_args["weight_version"] = weight_version

    def versions(self) -> dict[str, str]:
        """Each server's weight version (GET /model_info on each)."""
        return {info_url: info["weight_version"]
                for info_url, info in zip(self.client.urls, self.client.model_info())}

    def check_versions(self, expected: str) -> dict[str, str]:
        """WeightUpdateError naming every server whose weight version is not `expected`."""
        versions = self.versions()
        if any(v != expected for v in versions.values()):
            raise WeightUpdateError(f"weight version check (expected {expected!r})", [
                ServerReply(u, v == expected, f"at weight version {v!r}", 0.0) for u, v in versions.items()])
        return versions

    def server_pids(self) -> list[int | None]:
        """The server processes' ids (on their nodes)."""
        import ray
        return ray.get([a.pid.remote() for a in self.actors], timeout=30)

    def wait_for(self, kind: str, count: int = 1, timeout: float = 120.0) -> list[FleetEvent]:
        """Until the monitor has recorded `count` events of `kind`; answers them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events if e.kind == kind]
            if len(found) >= count:
                return found
            time.sleep(0.1)
        raise TimeoutError(f"{count} {kind!r} events not seen within {timeout:g} s; last events: {self.events[-4:]}")

    # --- monitor --------------------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            for slot in range(len(self.actors)):
                if self._stop.is_set():
                    return
                why = self._why_dead(slot)
                if why:
                    self.events.append(FleetEvent("dead", slot, self.urls[slot], time.monotonic(), why))
                    self._replace(slot)

    def _why_dead(self, slot: int) -> str:
        """Empty while the server lives; else why it counts as dead (actor lost, process exited, /health)."""
        import ray
        try:
            running = ray.get(self.actors[slot].alive.remote(), timeout=10)
        except Exception as e:  # RayActorError (node or actor lost), GetTimeoutError
            return f"actor: {type(e).__name__}"
        if not running:
            return "process exited"
        try:
            healthy = requests.get(self.urls[slot] + "/health", timeout=2).status_code == 200
        except requests.RequestException:
            healthy = False
        self._failures[slot] = 0 if healthy else self._failures[slot] + 1
        return f"/health failed {HEALTH_FAILURES} times" if self._failures[slot] >= HEALTH_FAILURES else ""

    def _replace(self, slot: int) -> None:
        """Out of the router, restarted in its bundle (same actor and port if the actor lives), back in."""
        import ray
        url = self.urls[slot]
        with self._lock:
            args = dict(self.server_args)
        try:
            if self.router_url:
                remove_worker(self.router_url, url, api_key=args.get("api_key"))
            try:
                new_url = ray.get(self.actors[slot].start.remote(args), timeout=600)
            except ray.exceptions.RayActorError:
                # The actor (or its node) is gone, its server with it (ServerActor): a new actor in the same
                # bundle. Killed first, so an actor only unreachable for now frees the bundle too.
                _kill(self.actors[slot])
                self.actors[slot] = self._actor_cls.options(**self._strategy_for(slot)).remote()
                if self._stop.is_set():  # shutdown began meanwhile: it stops the actors it knows
                    _kill(self.actors[slot])
                    return
                new_url = ray.get(self.actors[slot].start.remote(args), timeout=600)
            if new_url != url:  # another port (or node): the client's control calls follow it
                self.urls[slot] = new_url
                self.client.replace_worker(url, new_url)
            if self.router_url:
                add_worker(self.router_url, new_url, api_key=args.get("api_key"))
            self._failures[slot] = 0
            self.events.append(FleetEvent("replaced", slot, new_url, time.monotonic()))
        except Exception as e:  # tried again on the next poll
            self.events.append(FleetEvent("replace_failed", slot, url, time.monotonic(), repr(e)))

    # --- shutdown -------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the monitor, the client, the router (if the fleet started it; else take its servers out),
        every server and actor, the placement group, and Ray if the fleet started it."""
        import ray
        if self._stop.is_set():
            return
        self._stop.set()
        self._monitor.join(30)
        self.client.close()
        if self.router is not None:
            self.router.stop()
        elif self.router_url:
            for u in self.urls:
                try:
                    remove_worker(self.router_url, u)
                except Exception:
                    pass
        _stop_actors(self.actors)
        ray.util.remove_placement_group(self.placement_group)
        if self._owns_ray:
            ray.shutdown()

    def __enter__(self) -> "Fleet":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"Fleet(router={self.router_url or None}, workers={self.urls})"


def _stop_actors(actors: list[Any]) -> None:
    import ray
    stops = [a.stop.remote() for a in actors]
    deadline = time.monotonic() + 60
    for ref in stops:  # one by one: a lost actor's error does not cut the wait for the others short
        try:
            ray.get(ref, timeout=max(deadline - time.monotonic(), 1.0))
        except Exception:
            pass
    for a in actors:
        _kill(a)


def _kill(actor: Any) -> None:
    import ray
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already gone
        pass
