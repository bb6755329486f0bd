"""POST /v1/tokenize and /v1/detokenize: the OpenAI-side tokenizer routes of SGLang and vLLM.

/v1/tokenize takes either SGLang's `prompt` (str | list[str], `add_special_tokens` default true) or
vLLM's chat form: `messages` rendered with the tokenizer's own chat template (transformers'
`apply_chat_template`; `add_generation_prompt` default true, `continue_final_message`, `tools`,
`chat_template_kwargs`), then tokenized with `add_special_tokens` default false (the template already has
them), as vLLM does. Answer: `{"tokens", "count", "max_model_len"}` (and `token_strs` with
`return_token_strs`). /v1/detokenize is /detokenize's body and answer. Errors are in OpenAI's shape.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import Response

from rollout.server.chat_template import render_chat
from rollout.server.engine_client import EngineClient
from rollout.server.openai_schemas import OpenAIBadRequest
from rollout.server.responses import json_response, openai_error
from rollout.server.schemas import BadRequest, parse_detokenize, parse_json_body, parse_tokenize, short

PROMPT_FIELDS = {"prompt", "add_special_tokens", "return_token_strs", "model"}
CHAT_FIELDS = {"messages", "add_generation_prompt", "continue_final_message", "add_special_tokens", "tools",
               "chat_template_kwargs", "return_token_strs", "model"}
DETOKENIZE_FIELDS = {"tokens", "skip_special_tokens", "model"}


def _param(e: BadRequest) -> str | None:
    """OpenAI's `param` of an error: the field its message starts with (the parsers name the field first)."""
    first = str(e).split(" ", 1)[0]
    return getattr(e, "param", None) or (first if first in PROMPT_FIELDS | CHAT_FIELDS | DETOKENIZE_FIELDS else None)


def _bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be a boolean, got {short(value)}.")
    return value


def _check_fields(body: dict[str, Any], known: set[str], route: str) -> None:
    for key in body:
        if key not in known:
            raise OpenAIBadRequest(f"Unknown field in the {route} body: {key}={short(body[key])}.", key)


def render_body_chat(tokenizer: Any, body: dict[str, Any]) -> str:
    """The chat of a /v1/tokenize body as the model sees it (rollout/server/chat_template.py renders it)."""
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise BadRequest(f"chat_template_kwargs must be an object, got {short(kwargs)}.")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise BadRequest(f"tools must be a list of tool definitions, got {short(tools)}.")
    add_generation_prompt = _bool(body, "add_generation_prompt", True)
    continue_final = _bool(body, "continue_final_message", False)
    if add_generation_prompt and continue_final and "add_generation_prompt" in body:
        raise BadRequest("add_generation_prompt and continue_final_message cannot both be true.")
    return render_chat(tokenizer, body["messages"], add_generation_prompt=add_generation_prompt,
                       continue_final_message=continue_final, tools=tools, chat_template_kwargs=kwargs)


def add_tokenize_routes(app: FastAPI, engine_client: EngineClient) -> None:
    def tokenizer() -> Any:
        engine_client.check_available()
        if engine_client.tokenizer is None:
            raise BadRequest("This route needs the tokenizer, but the server runs with --skip-tokenizer-init.")
        return engine_client.tokenizer

    async def tokenize_body(body: dict[str, Any]) -> dict[str, Any]:
        tok = tokenizer()
        if ("messages" in body) == ("prompt" in body):
            raise OpenAIBadRequest("The body must hold exactly one of 'prompt' (text) and 'messages' (a chat), got "
                                   f"fields {short(sorted(body))}.", "prompt")
        if "messages" in body:
            _check_fields(body, CHAT_FIELDS, "/v1/tokenize")
            texts: Any = render_body_chat(tok, body)
            add_special = _bool(body, "add_special_tokens", False)
        else:
            _check_fields(body, PROMPT_FIELDS, "/v1/tokenize")
            texts, add_special = parse_tokenize(body)
        batch = isinstance(texts, list)
        return_strs = _bool(body, "return_token_strs", False)
        # Big texts are tokenized off the event loop (rollout/server/text_codec.py), as /tokenize's.
        ids = await engine_client.codec.encode_many(texts if batch else [texts], add_special)
        answer: dict[str, Any] = {"tokens": ids if batch else ids[0],
                                  "count": [len(t) for t in ids] if batch else len(ids[0]),
                                  "max_model_len": engine_client.info.context_len}
        if return_strs:
            strs = [tok.convert_ids_to_tokens(t) for t in ids]
            answer["token_strs"] = strs if batch else strs[0]
        return answer

    async def v1_tokenize(request: Request) -> Response:
        try:
            return json_response(await tokenize_body(parse_json_body(await request.body())))
        except BadRequest as e:
            return openai_error(str(e), 400, _param(e))

    async def v1_detokenize(request: Request) -> Response:
        try:
            body = parse_json_body(await request.body())
            _check_fields(body, DETOKENIZE_FIELDS, "/v1/detokenize")
            tokenizer()
            tokens, skip = parse_detokenize(body, engine_client.info.vocab_size)
        except BadRequest as e:
            return openai_error(str(e), 400, _param(e))
        batch = bool(tokens) and isinstance(tokens[0], list)
        text = await engine_client.codec.decode_many(tokens if batch else [tokens], skip)  # off the loop when big
        return json_response({"text": text if batch else text[0]})

    app.add_api_route("/v1/tokenize", v1_tokenize, methods=["POST"])
    app.add_api_route("/v1/detokenize", v1_detokenize, methods=["POST"])
