"""The expert distribution routes of API.md: /start_expert_distribution_record,
/stop_expert_distribution_record and /dump_expert_distribution_record (MoE models).

Each sends one control message on the request queue (the engine applies it between steps, in order;
runtime/expert_distribution.py keeps the record). A dump answers where it wrote the record (a safetensors
file and a CSV `layer_id,expert_id,count`), the CSV's text and a summary. On a dense model every route is a
400 that says so.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from starlette.responses import Response

from rollout.server.engine_client import EngineClient
from rollout.server.responses import error_response, json_response
from rollout.server.schemas import BadRequest, parse_json_body
from runtime.messages import ExpertDistributionReq

CONTROL_TIMEOUT_S = 120.0
DENSE_MODEL = ("{route} needs a mixture-of-experts model; {model} is dense (no MoE layer routes tokens to experts).")


def add_expert_routes(app: FastAPI, engine_client: EngineClient) -> None:
    def route_for(action: str, path: str):
        async def route(request: Request) -> Response:
            parse_json_body(await request.body(), allow_empty=True)  # a body that is not JSON is still a 400
            engine_client.check_available()
            if engine_client.moe_layout is None:
                raise BadRequest(DENSE_MODEL.format(route=path, model=engine_client.model_path))
            result = await engine_client.control(ExpertDistributionReq, CONTROL_TIMEOUT_S, action=action)
            if not result.success:
                return error_response(result.message, 400)
            body: dict = {"success": True, "message": result.message}
            if result.report is not None:
                body.update(result.report)
                try:
                    with open(result.report["csv_path"]) as f:
                        body["csv"] = f.read()
                except OSError:  # the engine wrote it on this machine; answer without the text if it is gone
                    body["csv"] = None
            return json_response(body)
        return route

    for action in ("start", "stop", "dump"):
        path = f"/{action}_expert_distribution_record"
        app.add_api_route(path, route_for(action, path), methods=["POST", "GET"])
