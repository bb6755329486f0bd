"""What every route module answers with: JSON bodies, the error shape of API.md, and the abort of a call
whose client went away. Its own module so that route modules import it and not each other."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from fastapi import Request
from starlette.responses import Response

from rollout.server.engine_client import EngineClient, GenerateCall

logger = logging.getLogger(__name__)

_encoder = msgspec.json.Encoder()


def encode_json(obj: Any) -> bytes:
    return _encoder.encode(obj)


def json_response(obj: Any, status_code: int = 200) -> Response:
    return Response(_encoder.encode(obj), status_code=status_code, media_type="application/json")


def error_response(message: str, status_code: int) -> Response:
    return json_response({"error": {"message": message}}, status_code)


async def watch_disconnect(request: Request, engine_client: EngineClient, call: GenerateCall) -> None:
    """Abort the call in the engine as soon as its client disconnects (the body is already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            break
    if not call.finished:
        logger.debug("Client of %s disconnected; aborting.", call.rids[:3])
        engine_client.disconnect(call)
