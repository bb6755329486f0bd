"""Load, version and metrics routes that routers and monitoring read, in SGLang's shapes:
GET /get_load (what sglang-router polls), /v1/loads, /get_weight_version (and /weight_version), /metrics.

All of them read the scheduler's live state (runtime/scheduler.py `state()`) through one state query.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import Response

from rollout.server.engine_client import EngineClient
from rollout.server.metrics import CONTENT_TYPE
from rollout.server.responses import error_response, json_response
from rollout.server.schemas import BadRequest, short

STATE_TIMEOUT_S = 30.0
LOADS_SECTIONS = ("core", "memory", "spec", "lora", "disagg", "queues", "all")
METRICS_OFF = "Metrics are off: start the server with --enable-metrics to serve /metrics."


def load_entry(state: dict[str, Any]) -> dict[str, Any]:
    """/get_load's entry: requests and tokens the scheduler holds (KV in use by requests, not evictable
    cache, plus the prompts still waiting), summed by sglang-router for its load-aware policies."""
    running, waiting = state["num_running_reqs"], state["num_waiting_reqs"]
    used = state["kv_used_tokens"] - state["cache_evictable_tokens"]
    return {"rid": None, "http_worker_ipc": None, "dp_rank": 0, "num_reqs": running + waiting,
            "num_waiting_reqs": waiting, "num_tokens": used + state.get("num_waiting_tokens", 0)}


def add_info_routes(app: FastAPI, engine_client: EngineClient, version: str) -> None:
    async def live_state() -> dict[str, Any]:
        engine_client.check_available()
        return await engine_client.server_state(STATE_TIMEOUT_S)

    async def get_load(request: Request) -> Response:
        return json_response([load_entry(await live_state())])

    async def get_loads(request: Request) -> Response:
        query = request.query_params
        include = [s.strip() for s in query.get("include", "all").split(",") if s.strip()] or ["all"]
        bad = [s for s in include if s not in LOADS_SECTIONS]
        if bad:
            raise BadRequest(f"include has unknown sections {bad}; valid: {list(LOADS_SECTIONS)}.")
        fmt = query.get("format", "json")
        if fmt not in ("json", "prometheus"):
            raise BadRequest(f"format must be 'json' or 'prometheus', got {short(fmt)}.")
        dp_rank = query.get("dp_rank")
        # isdigit() also holds for superscripts and other digits int() refuses: parse, don't classify.
        if dp_rank is not None and not (dp_rank.isascii() and dp_rank.lstrip("-").isdigit()):
            raise BadRequest(f"dp_rank must be an integer, got {short(dp_rank)}.")
        state = await live_state()
        loads = [] if dp_rank is not None and int(dp_rank) != 0 else [_loads_entry(state, include)]
        if fmt == "prometheus":
            return Response(_loads_text(loads), media_type=CONTENT_TYPE)
        return json_response({
            "timestamp": datetime.now(timezone.utc).isoformat(),
            "version": version,
            "dp_rank_count": len(loads),
            "loads": loads,
            "aggregate": _aggregate(loads),
        })

    def _loads_entry(state: dict[str, Any], include: list[str]) -> dict[str, Any]:
        running, waiting = state["num_running_reqs"], state["num_waiting_reqs"]
        max_running = engine_client.info.max_running_requests
        metrics = engine_client.metrics
        entry: dict[str, Any] = {
            "dp_rank": 0,
            "num_running_reqs": running,
            "num_waiting_reqs": waiting,
            "num_used_tokens": state["kv_used_tokens"] - state["cache_evictable_tokens"],
            "max_total_num_tokens": state["max_total_num_tokens"],
            "token_usage": state["token_usage"],
            # Rates are measured only with --enable-metrics (rollout/server/metrics.py); 0.0 without.
            "gen_throughput": metrics.gen_throughput if metrics is not None else 0.0,
            "cache_hit_rate": metrics.cache_hit_rate if metrics is not None else 0.0,
            "utilization": running / max(max_running, 1),
            "max_running_requests": max_running,
            "num_total_reqs": running + waiting,
        }
        if "all" in include or "queues" in include:
            entry["queues"] = {"waiting": waiting, "grammar": 0,
                               "paused": running + waiting if state.get("paused") else 0, "retracted": 0}
        return entry

    async def weight_version(request: Request) -> Response:
        engine_client.check_available()
        return json_response({"weight_version": engine_client.weight_version})

    async def metrics(request: Request) -> Response:
        if engine_client.metrics is None:
            return error_response(METRICS_OFF, 404)
        state = await live_state()
        return Response(engine_client.metrics.render(state, engine_client.weight_version), media_type=CONTENT_TYPE)

    app.add_api_route("/get_load", get_load, methods=["GET"])
    app.add_api_route("/v1/loads", get_loads, methods=["GET"])
    for path in ("/get_weight_version", "/weight_version"):
        app.add_api_route(path, weight_version, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])


def _aggregate(loads: list[dict[str, Any]]) -> dict[str, Any]:
    n = max(len(loads), 1)
    return {
        "total_running_reqs": sum(d["num_running_reqs"] for d in loads),
        "total_waiting_reqs": sum(d["num_waiting_reqs"] for d in loads),
        "total_reqs": sum(d["num_total_reqs"] for d in loads),
        "avg_token_usage": round(sum(d["token_usage"] for d in loads) / n, 4),
        "avg_throughput": round(sum(d["gen_throughput"] for d in loads) / n, 2),
        "avg_utilization": round(sum(d["utilization"] for d in loads) / n, 4),
    }


def _loads_text(loads: list[dict[str, Any]]) -> bytes:
    """/v1/loads?format=prometheus: one gauge per numeric field, labelled by dp_rank."""
    lines: list[str] = []
    for key in ("num_running_reqs", "num_waiting_reqs", "num_used_tokens", "max_total_num_tokens", "token_usage",
                "gen_throughput", "cache_hit_rate", "utilization", "max_running_requests"):
        lines += [f"# TYPE sglang_{key} gauge"]
        lines += [f'sglang_{key}{{dp_rank="{d["dp_rank"]}"}} {d[key]}' for d in loads]
    return ("\n".join(lines) + "\n").encode()
