"""The routes of API.md (generation, info, health, tokens, cache, abort) on FastAPI.

Bodies are parsed by rollout/server/schemas.py, never by FastAPI's validation, so a bad body is a 400
`{"error": {"message": ...}}` and never a 422. A dead or silent engine is a 503 with the reason.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response, StreamingResponse

from rollout.server.info_routes import add_info_routes
from rollout.server.metrics import ServerMetrics
from rollout.server.auth import ApiKeyMiddleware
from rollout.server.engine_client import ClientDisconnected, EngineClient, EngineUnavailable, GenerateCall, QueueFull
from rollout.server.limits import BodyLimitMiddleware, queue_full_response
from rollout.server.responses import encode_json, error_response, json_response, watched
from rollout.server.schemas import (BadRequest, parse_abort, parse_detokenize, parse_generate, parse_json_body,
                                    parse_timeout, parse_tokenize)
from rollout.server.openai_routes import add_openai_routes
from rollout.server.expert_routes import add_expert_routes
from rollout.server.scoring_routes import add_scoring_routes
from rollout.server.tokenize_routes import add_tokenize_routes
from rollout.server.weight_routes import add_weight_routes
from runtime.scoring_input import NEEDS_GENERATION

logger = logging.getLogger(__name__)

FLUSH_OK_TEXT = ("Cache flushed.\nPlease check backend logs for more details. (When there are running or waiting "
                 "requests, the operation will not be performed.)\n")
HEALTH_TIMEOUT_S = 20.0
INFO_TIMEOUT_S = 30.0


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("rl-rollout")
    except Exception:
        return "unknown"


def create_app(engine_client: EngineClient, engine: Any = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engine is not None:
            await engine_client.start(engine)
        try:
            yield
        finally:
            await engine_client.close()

    app = FastAPI(title="rl-rollout", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.engine_client = engine_client
    if engine_client.args.enable_metrics:
        engine_client.metrics = ServerMetrics(model_name=str(engine_client.model_path))

    # --- errors ---------------------------------------------------------------------------------

    @app.exception_handler(BadRequest)
    async def _bad_request(request: Request, exc: BadRequest) -> Response:
        return error_response(str(exc), 400)

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, exc: QueueFull) -> Response:
        return queue_full_response(str(exc))

    @app.exception_handler(EngineUnavailable)
    async def _unavailable(request: Request, exc: EngineUnavailable) -> Response:
        return error_response(str(exc), exc.status)  # 503; 500 for a request the scheduler failed

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return error_response(f"Invalid request: {exc.errors()}", 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(str(exc.detail), exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        logger.exception("Internal error on %s", request.url.path)
        return error_response(f"Internal server error: {type(exc).__name__}: {exc}", 500)

    # --- generation -----------------------------------------------------------------------------

    async def generate(request: Request) -> Response:
        start = time.monotonic()
        engine_client.check_available()
        if engine_client.args.is_embedding:
            raise BadRequest(NEEDS_GENERATION.format(route="/generate"))
        body = parse_json_body(await request.body())
        inp = parse_generate(body, engine_client.info.vocab_size, engine_client.args.max_n)
        try:
            norm = await engine_client.normalize_async(inp)
        except ValueError as e:  # runtime/generate_input.py's checks, with API.md's messages
            raise BadRequest(str(e)) from None
        if engine_client.tokenizer is None:
            for r in norm.requests:
                if r.sampling_params.stop:
                    raise BadRequest(f"sampling_params.stop={r.sampling_params.stop!r} needs the tokenizer, but the "
                                     "server runs with --skip-tokenizer-init; use stop_token_ids.")
        try:
            call = engine_client.submit(norm, inp.return_text_in_logprobs, inp.stream, start,
                                        log_metrics=body.get("log_metrics") is not False)
        except ValueError as e:  # an rid already in flight
            raise BadRequest(str(e)) from None
        if inp.stream:
            return StreamingResponse(_sse(request, call), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            async with watched(request, engine_client, call):
                results = await engine_client.wait(call)
        except ClientDisconnected:
            return Response(status_code=499)  # nobody reads it
        return json_response(results if call.is_batch else results[0])

    async def _sse(request: Request, call: GenerateCall) -> AsyncIterator[bytes]:
        # Starlette also cancels this generator when the client leaves (ASGI spec < 2.4); the watcher
        # makes the abort independent of that.
        async with watched(request, engine_client, call):
            try:
                async for chunk in engine_client.stream(call):
                    yield b"data: " + encode_json(chunk) + b"\n\n"
            except EngineUnavailable as e:
                yield b"data: " + encode_json({"error": {"message": str(e)}}) + b"\n\n"
            except ClientDisconnected:
                return
        yield b"data: [DONE]\n\n"

    app.add_api_route("/generate", generate, methods=["POST", "PUT"])

    # --- info -----------------------------------------------------------------------------------

    async def model_info(request: Request) -> Response:
        engine_client.check_available()
        return json_response(engine_client.model_info())

    async def server_info(request: Request) -> Response:
        engine_client.check_available()
        state = await engine_client.server_state(INFO_TIMEOUT_S)
        args = engine_client.args.to_dict()
        for key in ("api_key", "admin_api_key"):
            if args.get(key):
                args[key] = "<hidden>"
        info = dict(args)
        info.update({
            "max_total_num_tokens": engine_client.info.max_total_num_tokens,
            "max_req_input_len": engine_client.info.context_len - 1,
            "context_length": engine_client.info.context_len,
            "vocab_size": engine_client.info.vocab_size,
            "weight_version": engine_client.weight_version,
            "version": _version(),
            "internal_states": [state],
        })
        return json_response(info)

    for path in ("/get_model_info", "/model_info"):
        app.add_api_route(path, model_info, methods=["GET"])
    for path in ("/get_server_info", "/server_info"):
        app.add_api_route(path, server_info, methods=["GET"])

    # --- health ---------------------------------------------------------------------------------

    async def health(request: Request) -> Response:
        await engine_client.health(HEALTH_TIMEOUT_S)
        return Response(status_code=200)

    async def health_generate(request: Request) -> Response:
        await engine_client.health_generate(HEALTH_TIMEOUT_S)
        return Response(status_code=200)

    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/health_generate", health_generate, methods=["GET"])

    # --- cache and abort ------------------------------------------------------------------------

    async def flush_cache(request: Request) -> Response:
        body = parse_json_body(await request.body(), allow_empty=True)
        timeout = parse_timeout(request.query_params.get("timeout", body.get("timeout")))
        result = await engine_client.flush_cache(timeout)
        if result.success:
            return Response(FLUSH_OK_TEXT, status_code=200, media_type="text/plain")
        return error_response(result.message or "Cache not flushed: there are running or waiting requests.", 400)

    async def abort_request(request: Request) -> Response:
        rid, abort_all = parse_abort(parse_json_body(await request.body(), allow_empty=True))
        if rid or abort_all:
            engine_client.abort(rid, abort_all)
        else:
            engine_client.check_available()
        return Response(status_code=200)

    app.add_api_route("/flush_cache", flush_cache, methods=["GET", "POST"])
    app.add_api_route("/abort_request", abort_request, methods=["POST"])

    # --- tokens ---------------------------------------------------------------------------------

    def _tokenizer() -> Any:
        engine_client.check_available()
        if engine_client.tokenizer is None:
            raise BadRequest("This route needs the tokenizer, but the server runs with --skip-tokenizer-init.")
        return engine_client.tokenizer

    # Big inputs are tokenized in the tokenizer process and checked on a thread (rollout/server/text_codec.py).

    async def tokenize(request: Request) -> Response:
        _tokenizer()
        codec = engine_client.codec
        prompt, add_special = parse_tokenize(parse_json_body(await request.body()))
        single = not isinstance(prompt, list)
        tokens, counts = await codec.tokenize_json([prompt] if single else prompt, add_special, single)
        count: Any = counts[0] if single else counts
        return json_response({"tokens": tokens, "count": count, "max_model_len": engine_client.info.context_len})

    async def detokenize(request: Request) -> Response:
        _tokenizer()
        codec = engine_client.codec
        raw = await request.body()
        tokens, skip = await codec.run(len(raw) // 4, parse_detokenize, parse_json_body(raw), engine_client.info.vocab_size)
        batch = bool(tokens) and isinstance(tokens[0], list)
        text = await codec.decode_many(tokens if batch else [tokens], skip)
        return json_response({"text": text if batch else text[0]})

    app.add_api_route("/tokenize", tokenize, methods=["POST"])
    app.add_api_route("/detokenize", detokenize, methods=["POST"])

    # --- weight updates and generation control (rollout/server/weight_routes.py) ------------------------
    add_weight_routes(app, engine_client)
    add_scoring_routes(app, engine_client)
    add_openai_routes(app, engine_client)
    # Routers' and monitoring's routes (/get_load, /v1/loads, /get_weight_version, /metrics), /v1/tokenize.
    add_info_routes(app, engine_client, _version())
    add_tokenize_routes(app, engine_client)
    add_expert_routes(app, engine_client)

    # Starlette runs the last added middleware first: the key is checked before a body is read.
    args = engine_client.args
    app.add_middleware(BodyLimitMiddleware, max_bytes=args.max_request_bytes,
                       max_weight_bytes=args.max_weight_request_bytes, read_timeout_s=args.request_read_timeout)
    if args.api_key or args.admin_api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=args.api_key, admin_api_key=args.admin_api_key)
    return app
