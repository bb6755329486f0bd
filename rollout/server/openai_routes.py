"""OpenAI-compatible routes on the same engine: /v1/models, /v1/completions, /v1/chat/completions,
/v1/embeddings.

A request becomes the same per-sample scheduler requests as /generate (runtime/generate_input.py), so
greedy tokens, logprobs and seeds are /generate's. Errors use OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`; bad input is a 400 naming the field.
"""

from __future__ import annotations

import base64
import functools
import logging
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

import numpy as np
from fastapi import FastAPI, Request
from starlette.responses import Response, StreamingResponse

from rollout.server.chat_template import chat_prompt_text
from rollout.server.engine_client import ClientDisconnected, EngineClient, EngineUnavailable, GenerateCall, QueueFull
from rollout.server.limits import RETRY_AFTER_S
from rollout.server.openai_render import OpenAIRender
from rollout.server.openai_schemas import (ChatCompletionRequest, CompletionRequest, EmbeddingRequest,
                                           OpenAIBadRequest, chat_logprobs, chat_max_tokens, check_prompt_ids,
                                           completion_logprobs, parse_request, prompts, response_format_schema,
                                           sampling_params)
from rollout.server.responses import OPENAI_ERROR_TYPES, encode_json, json_response, openai_error, watched
from rollout.server.schemas import BadRequest, parse_json_body
from rollout.server.text_codec import total_chars
from runtime.generate_input import GenerateInput
from runtime.scoring_input import NEEDS_EMBEDDING, NEEDS_GENERATION, model_limits, normalize_embed
from runtime.scoring_output import ScoringAborted

logger = logging.getLogger(__name__)

# A runtime check's message starts with the /generate name of the field; OpenAI's name for it.
_PARAM_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "sampling_seed": "seed"}
_PROMPT_WORDS = ("input_ids", "The")  # "The input (N tokens) is longer than ..."


def _param_of(message: str, prompt_param: str | None = None) -> str | None:
    """The request field a check's message is about (None when it names none)."""
    first = message.split(" ", 1)[0].split("=", 1)[0].split("[", 1)[0].rstrip(":,.")
    if first in _PROMPT_WORDS:
        return prompt_param
    return _PARAM_NAMES.get(first, first if first.isidentifier() and first.islower() else None)


def openai_errors(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Every failure of an OpenAI route in OpenAI's error shape."""

    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except OpenAIBadRequest as e:
            return openai_error(str(e), 400, e.param)
        except BadRequest as e:
            return openai_error(str(e), 400, _param_of(str(e)))
        except EngineUnavailable as e:
            return openai_error(str(e), e.status)
        except QueueFull as e:  # --max-queued-requests: retry later (the openai client honours Retry-After)
            response = openai_error(str(e), 429)
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
            return response
        except Exception as e:  # our bug: logged, and still OpenAI's shape
            logger.exception("Internal error on %s", request.url.path)
            return openai_error(f"Internal server error: {type(e).__name__}: {e}", 500)

    return wrapped


def _sse(obj: Any) -> bytes:
    return b"data: " + encode_json(obj) + b"\n\n"


def add_openai_routes(app: FastAPI, engine_client: EngineClient) -> None:

    def served_model() -> str:
        return engine_client.model_path or "default"

    def tokenizer() -> Any:
        engine_client.check_available()
        if engine_client.tokenizer is None:
            raise OpenAIBadRequest("The OpenAI routes need the tokenizer, but the server runs with "
                                   "--skip-tokenizer-init; use /generate with input_ids.")
        return engine_client.tokenizer

    def need_generation(route: str) -> None:
        engine_client.check_available()
        if engine_client.args.is_embedding:
            raise OpenAIBadRequest(NEEDS_GENERATION.format(route=route))

    def render_for(req: CompletionRequest | ChatCompletionRequest, tok: Any, *, chat: bool, response_id: str,
                   top: int | None, echo: list[str] | None = None) -> OpenAIRender:
        return OpenAIRender(tok, chat=chat, response_id=response_id, model=req.model or served_model(), n=req.n,
                            top_logprobs=top, return_token_ids=req.return_token_ids,
                            sglext_input_ids=req.return_input_ids_in_sglext,
                            sglext_output_ids=req.return_output_ids_in_sglext, echo_texts=echo)

    async def run(request: Request, inp: GenerateInput, render: OpenAIRender,
                  req: CompletionRequest | ChatCompletionRequest, start: float) -> Response:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        try:
            norm = await engine_client.normalize_async(inp)  # big prompts tokenized off the event loop
        except ValueError as e:  # runtime/generate_input.py's checks
            message = str(e)
            if message.startswith("text"):  # /generate's name for a completion's text prompt
                message = "prompt" + message[len("text"):]
            raise OpenAIBadRequest(message, _param_of(message, "messages" if render.chat else "prompt")) from None
        try:
            call = engine_client.submit(norm, False, inp.stream, start)
        except ValueError as e:  # an rid already in flight
            raise OpenAIBadRequest(str(e), "rid") from None
        if inp.stream:
            return StreamingResponse(stream(request, call, render, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            async with watched(request, engine_client, call):
                await engine_client.wait(call)
        except ClientDisconnected:
            return Response(status_code=499)
        return json_response(render.response(call.builders))

    async def stream(request: Request, call: GenerateCall, render: OpenAIRender,
                     include_usage: bool) -> AsyncIterator[bytes]:
        async with watched(request, engine_client, call):
            try:
                async for update in engine_client.stream(call):
                    index = update.get("index", 0)
                    chunk = render.delta_chunk(index, call.builders[index])
                    if chunk is not None:
                        yield _sse(chunk)
                final = render.final_chunk(call.builders, include_usage)
                if final is not None:
                    yield _sse(final)
            except EngineUnavailable as e:
                yield _sse({"error": {"message": str(e), "type": OPENAI_ERROR_TYPES[503], "param": None, "code": 503}})
            except ClientDisconnected:
                return
        yield b"data: [DONE]\n\n"

    @openai_errors
    async def completions(request: Request) -> Response:
        start = time.monotonic()
        need_generation("/v1/completions")
        tok = tokenizer()
        req: CompletionRequest = parse_request(parse_json_body(await request.body()), CompletionRequest)
        top = completion_logprobs(req)
        texts, ids = prompts(req)
        count = len(texts if texts is not None else ids)
        if ids is not None:
            check_prompt_ids(ids, engine_client.info.vocab_size)
        sp = sampling_params(req, req.max_tokens, engine_client.info.context_len, count, engine_client.args.max_n)
        response_id = f"cmpl-{uuid.uuid4().hex}"
        inp = GenerateInput(text=(texts if count > 1 else texts[0]) if texts is not None else None,
                            input_ids=(ids if count > 1 else ids[0]) if ids is not None else None,
                            sampling_params=sp, rid=req.rid or response_id, return_logprob=top is not None,
                            top_logprobs_num=top or 0, stream=req.stream)
        echo = None
        if req.echo:
            echo = texts if texts is not None else await engine_client.codec.decode_many(ids, False)
        render = render_for(req, tok, chat=False, response_id=response_id, top=top, echo=echo)
        return await run(request, inp, render, req, start)

    @openai_errors
    async def chat_completions(request: Request) -> Response:
        start = time.monotonic()
        need_generation("/v1/chat/completions")
        tok = tokenizer()
        req: ChatCompletionRequest = parse_request(parse_json_body(await request.body()), ChatCompletionRequest)
        top = chat_logprobs(req)
        sp = sampling_params(req, chat_max_tokens(req), engine_client.info.context_len, 1, engine_client.args.max_n)
        schema = response_format_schema(req)
        if schema is not None:
            if req.json_schema is not None or req.regex is not None or req.ebnf is not None:
                raise OpenAIBadRequest("response_format and json_schema / regex / ebnf constrain the same output; "
                                       "send one.", "response_format")
            sp["json_schema"] = schema
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        ids = (await engine_client.codec.encode_many([chat_prompt_text(tok, req)], add_special_tokens=False))[0]
        inp = GenerateInput(input_ids=ids, sampling_params=sp, rid=req.rid or response_id,
                            return_logprob=top is not None, top_logprobs_num=top or 0, stream=req.stream)
        render = render_for(req, tok, chat=True, response_id=response_id, top=top)
        return await run(request, inp, render, req, start)

    @openai_errors
    async def embeddings(request: Request) -> Response:
        start = time.monotonic()
        engine_client.check_available()
        if not engine_client.args.is_embedding:
            raise OpenAIBadRequest(NEEDS_EMBEDDING.format(route="/v1/embeddings"))
        req: EmbeddingRequest = parse_request(parse_json_body(await request.body()), EmbeddingRequest)
        if req.encoding_format not in ("float", "base64"):
            raise OpenAIBadRequest(f"encoding_format must be 'float' or 'base64', got {req.encoding_format!r}.",
                                   "encoding_format")
        inp = req.input
        is_text = isinstance(inp, str) or (isinstance(inp, list) and bool(inp) and isinstance(inp[0], str))
        is_flat_ids = isinstance(inp, list) and bool(inp) and isinstance(inp[0], int)
        limits = model_limits(engine_client.hf_config, True, engine_client.info.vocab_size,
                              engine_client.info.context_len)
        texts = [inp] if isinstance(inp, str) else inp if is_text else None
        checked = (texts, None if is_text else [inp] if is_flat_ids else inp, req.rid or f"embd-{uuid.uuid4().hex}",
                   engine_client.tokenizer, limits)
        try:
            if engine_client.codec is None:
                norm = normalize_embed(*checked)
            else:  # big texts are tokenized on the codec's threads, off the event loop
                norm = await engine_client.codec.run(total_chars(texts), normalize_embed, *checked)
        except ValueError as e:
            raise OpenAIBadRequest(str(e).replace("input_ids", "input").replace("text", "input"), "input") from None
        collectors = norm.collectors(start)
        try:
            call = engine_client.submit_builders(collectors, True)
        except ValueError as e:
            raise OpenAIBadRequest(str(e), "rid") from None
        try:
            async with watched(request, engine_client, call):
                await engine_client.wait(call)
        except ClientDisconnected:
            return Response(status_code=499)
        data = []
        for i, c in enumerate(collectors):
            try:
                vector = c.to_dict()["embedding"]
            except ScoringAborted as e:
                raise OpenAIBadRequest(str(e)) from None
            if req.encoding_format == "base64":
                vector = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
            data.append({"object": "embedding", "index": i, "embedding": vector})
        tokens = sum(c.prompt_tokens for c in collectors)
        return json_response({"object": "list", "data": data, "model": req.model or served_model(),
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                              "metadata": {"weight_version": collectors[0].weight_version}})

    @openai_errors
    async def models(request: Request) -> Response:
        engine_client.check_available()
        return json_response({"object": "list", "data": [{
            "id": served_model(), "object": "model", "created": int(engine_client.started_at),
            "owned_by": "rl-rollout", "root": served_model(), "max_model_len": engine_client.info.context_len,
            "weight_version": engine_client.weight_version}]})

    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/embeddings", embeddings, methods=["POST"])
