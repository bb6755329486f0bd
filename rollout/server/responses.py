"""What every route module answers with: JSON bodies, the error shape of API.md, and the abort of a call
whose client went away. Its own module so that route modules import it and not each other."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator

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


OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                      429: "rate_limit_error", 500: "internal_server_error", 503: "service_unavailable_error"}


def openai_error(message: str, status_code: int, param: str | None = None) -> Response:
    """OpenAI's error shape, for the /v1/ routes."""
    return json_response({"error": {"message": message, "type": OPENAI_ERROR_TYPES.get(status_code, "error"),
                                    "param": param, "code": status_code}}, status_code)


async def watch_disconnect(request: Request, engine_client: EngineClient, call: GenerateCall) -> None:
    """Abort the call in the engine as soon as its client disconnects (the body is already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            break
    if not call.finished:
        logger.debug("Client of %s disconnected; aborting.", call.rids[:3])
        engine_client.disconnect(call)


@contextlib.asynccontextmanager
async def watched(request: Request, engine_client: EngineClient, call: GenerateCall) -> AsyncIterator[None]:
    """While the block runs, abort the call if its client disconnects; after it, abandon the call if it is
    still unfinished (the block was cancelled or raised)."""
    watcher = asyncio.ensure_future(watch_disconnect(request, engine_client, call))
    try:
        yield
    finally:
        watcher.cancel()
        if not call.finished:
            engine_client.abandon(call)
