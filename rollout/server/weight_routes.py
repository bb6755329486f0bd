"""The weight-update and generation-control routes of API.md on the FastAPI app.

Each route parses its body (rollout/server/weight_schemas.py: 400 naming field and value), sends one typed
control message on the request queue (the engine applies it between steps, in order, with the same
runtime/controller.py code the in-process Engine runs) and answers `{"success", "message"}`: 200, or 400
when success is false. A broken update makes /generate answer 503 with its message until the next good one.
"""

from __future__ import annotations

from typing import Any, Callable

from fastapi import FastAPI, Request
from starlette.responses import Response

from rollout.server.engine_client import EngineClient
from rollout.server.responses import error_response, json_response
from rollout.server.schemas import parse_json_body
from rollout.server.tensor_update_body import parse_tensor_update_body
from rollout.server.weight_schemas import (parse_destroy_group, parse_get_weights, parse_init_group,
                                           parse_memory_tags, parse_pause, parse_update_from_disk,
                                           parse_update_from_distributed, parse_update_weight_version)
from runtime.messages import (ContinueGenerationReq, ControlResult, DestroyWeightsUpdateGroupReq,
                              GetWeightsByNameReq, InitWeightsUpdateGroupReq, PauseGenerationReq, ReleaseMemoryReq,
                              ResumeMemoryReq, UpdateWeightsFromDiskReq, UpdateWeightsFromDistributedReq,
                              UpdateWeightsFromTensorReq, UpdateWeightVersionReq)

# How long the HTTP process waits for an answer. The engine enforces the real limits (a group's timeout
# bounds its join and each broadcast); these only cover an engine that stopped answering altogether.
CONTROL_TIMEOUT_S = 120.0
DISK_TIMEOUT_S = 1800.0
GROUP_MARGIN_S = 60.0


def add_weight_routes(app: FastAPI, engine_client: EngineClient) -> None:
    group_timeouts: dict[str, float] = {}  # per group: its join/broadcast timeout, from the init request

    async def body_of(request: Request) -> dict[str, Any]:
        body = parse_json_body(await request.body(), allow_empty=True)
        return {**dict(request.query_params), **body}

    def answer(result: ControlResult) -> Response:
        return json_response({"success": result.success, "message": result.message},
                             200 if result.success else 400)

    def plain(parse: Callable[[dict[str, Any]], dict[str, Any]], message: type, timeout: float) -> Any:
        """A route that parses its body, sends one control message and answers its result."""
        async def route(request: Request) -> Response:
            return answer(await engine_client.control(message, timeout, **parse(await body_of(request))))
        return route

    async def update_from_disk(request: Request) -> Response:
        fields = parse_update_from_disk(await body_of(request))
        result = await engine_client.control(UpdateWeightsFromDiskReq, DISK_TIMEOUT_S, **fields)
        if result.success:
            engine_client.model_path = fields["model_path"]
        return answer(result)

    async def update_from_tensor(request: Request) -> Response:
        # The body as the limits middleware delivered it (one buffer): Request.body() would join a copy.
        chunks = [chunk async for chunk in request.stream() if chunk]
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        fields, payloads = parse_tensor_update_body(body, dict(request.query_params))
        return answer(await engine_client.control(UpdateWeightsFromTensorReq, DISK_TIMEOUT_S, payloads, **fields))

    async def init_group(request: Request) -> Response:
        fields = parse_init_group(await body_of(request))
        result = await engine_client.control(InitWeightsUpdateGroupReq, fields["timeout"] + GROUP_MARGIN_S, **fields)
        if result.success:
            group_timeouts[fields["group_name"]] = fields["timeout"]
        return answer(result)

    async def update_from_distributed(request: Request) -> Response:
        fields = parse_update_from_distributed(await body_of(request))
        # One broadcast per tensor (or one bucket), each bounded by the group timeout.
        per_op = group_timeouts.get(fields["group_name"], CONTROL_TIMEOUT_S)
        count = 1 if fields["load_format"] == "flattened_bucket" else len(fields["names"])
        timeout = per_op * count + GROUP_MARGIN_S
        return answer(await engine_client.control(UpdateWeightsFromDistributedReq, timeout, **fields))

    async def destroy_group(request: Request) -> Response:
        fields = parse_destroy_group(await body_of(request))
        result = await engine_client.control(DestroyWeightsUpdateGroupReq, CONTROL_TIMEOUT_S, **fields)
        group_timeouts.pop(fields["group_name"], None)
        return answer(result)

    async def get_weights_by_name(request: Request) -> Response:
        fields = parse_get_weights(await body_of(request))
        result = await engine_client.control(GetWeightsByNameReq, CONTROL_TIMEOUT_S, **fields)
        if not result.success:
            return error_response(result.message, 400)
        return json_response(result.parameter)

    async def update_weight_version(request: Request) -> Response:
        fields = parse_update_weight_version(await body_of(request))
        result = await engine_client.control(UpdateWeightVersionReq, CONTROL_TIMEOUT_S, **fields)
        body = {"success": result.success, "message": result.message}
        if result.success:
            body["new_version"] = fields["new_version"]  # the key SGLang's clients read
        return json_response(body, 200 if result.success else 400)

    async def continue_generation(request: Request) -> Response:
        await body_of(request)  # a body that is not JSON is still a 400
        return answer(await engine_client.control(ContinueGenerationReq, CONTROL_TIMEOUT_S))

    routes: list[tuple[str, Any, list[str]]] = [
        ("/update_weights_from_disk", update_from_disk, ["POST"]),
        ("/init_weights_update_group", init_group, ["POST"]),
        ("/update_weights_from_distributed", update_from_distributed, ["POST"]),
        ("/destroy_weights_update_group", destroy_group, ["POST"]),
        ("/update_weights_from_tensor", update_from_tensor, ["POST"]),
        ("/get_weights_by_name", get_weights_by_name, ["GET", "POST"]),
        ("/update_weight_version", update_weight_version, ["POST"]),
        ("/pause_generation", plain(parse_pause, PauseGenerationReq, CONTROL_TIMEOUT_S), ["POST"]),
        ("/continue_generation", continue_generation, ["POST"]),
        ("/release_memory_occupation", plain(parse_memory_tags, ReleaseMemoryReq, CONTROL_TIMEOUT_S), ["POST"]),
        ("/resume_memory_occupation", plain(parse_memory_tags, ResumeMemoryReq, CONTROL_TIMEOUT_S), ["POST"]),
    ]
    for path, handler, methods in routes:
        app.add_api_route(path, handler, methods=methods)
