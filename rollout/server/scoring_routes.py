"""The Scoring routes of API.md: /encode and /classify (one handler), /v1/score, /v1/rerank.

A call's texts become one scheduler request each, sent together, so a batch of hundreds is one HTTP call
and a few batched forward passes. Checks shared with Engine.encode / score / rerank live in
runtime/scoring_input.py; this module adds the HTTP shapes and the per-server-kind 400s.
"""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from starlette.responses import Response

from rollout.server.engine_client import ClientDisconnected, EngineClient
from rollout.server.responses import json_response, watched
from rollout.server.schemas import BadRequest, parse_json_body
from rollout.server.scoring_schemas import parse_encode, parse_rerank, parse_score
from rollout.server.text_codec import total_chars
from runtime.scoring_input import (NEEDS_CROSS_ENCODER, NEEDS_EMBEDDING, NEEDS_GENERATION, ModelLimits,
                                   NormalizedScoring, is_cross_encoder, model_limits, normalize_embed,
                                   normalize_rerank, normalize_score, rerank_results)
from runtime.scoring_output import ScoringAborted, ScoringCollector


def add_scoring_routes(app: FastAPI, engine_client: EngineClient) -> None:
    traits: dict[str, object] = {}

    def limits() -> ModelLimits:
        engine_client.check_available()
        if "limits" not in traits:  # the engine's vocabulary and context are known once it is ready
            traits["limits"] = model_limits(engine_client.hf_config, engine_client.args.is_embedding,
                                            engine_client.info.vocab_size, engine_client.info.context_len)
            traits["cross_encoder"] = is_cross_encoder(engine_client.hf_config, engine_client.args.is_embedding)
        return traits["limits"]

    async def run(request: Request, norm: NormalizedScoring, start: float) -> list[ScoringCollector]:
        collectors = norm.collectors(start)
        try:
            call = engine_client.submit_builders(collectors, norm.is_batch)
        except ValueError as e:  # an rid already in flight
            raise BadRequest(str(e)) from None
        async with watched(request, engine_client, call):
            await engine_client.wait(call)
        return collectors

    def checked(fn, *args):
        """Run a runtime/scoring_input.py check or a result renderer; its ValueError is the client's 400."""
        try:
            return fn(*args)
        except (ValueError, ScoringAborted) as e:
            raise BadRequest(str(e)) from None

    async def checked_off_loop(size: int, fn, *args):
        """`checked(fn, *args)` for a tokenizing check: on the codec's threads when the input is big."""
        if engine_client.codec is None:
            return checked(fn, *args)
        return await engine_client.codec.run(size, checked, fn, *args)

    async def encode(request: Request) -> Response:
        start = time.monotonic()
        lim = limits()
        route = request.url.path
        if not engine_client.args.is_embedding:
            raise BadRequest(NEEDS_EMBEDDING.format(route=route))
        f = parse_encode(parse_json_body(await request.body()), route)
        norm = await checked_off_loop(total_chars(f["text"]), normalize_embed, f["text"], f["input_ids"], f["rid"],
                                      engine_client.tokenizer, lim)
        try:
            collectors = await run(request, norm, start)
        except ClientDisconnected:
            return Response(status_code=499)
        results = [checked(c.to_dict) for c in collectors]
        return json_response(results if norm.is_batch else results[0])

    async def score(request: Request) -> Response:
        lim = limits()
        if engine_client.args.is_embedding:
            raise BadRequest(NEEDS_GENERATION.format(route="/v1/score"))
        f = parse_score(parse_json_body(await request.body()))
        size = total_chars(f["query"]) + total_chars(f["items"])
        norm = await checked_off_loop(size, normalize_score, f["query"], f["items"], f["label_token_ids"],
                                      f["apply_softmax"], f["item_first"], engine_client.tokenizer, lim)
        try:
            collectors = await run(request, norm, time.monotonic())
        except ClientDisconnected:
            return Response(status_code=499)
        scores = [checked(c.label_scores, f["label_token_ids"], f["apply_softmax"]) for c in collectors]
        prompt_tokens = sum(c.prompt_tokens for c in collectors)
        return json_response({"scores": scores, "model": f["model"] or engine_client.args.model_path,
                              "object": "scoring",
                              "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 0,
                                        "total_tokens": prompt_tokens}})

    async def rerank(request: Request) -> Response:
        lim = limits()
        if not traits["cross_encoder"]:
            archs = getattr(engine_client.hf_config, "architectures", None)
            raise BadRequest(NEEDS_CROSS_ENCODER.format(route="/v1/rerank", archs=archs))
        f = parse_rerank(parse_json_body(await request.body()))
        size = total_chars(f["query"]) + total_chars(f["documents"])
        norm = await checked_off_loop(size, normalize_rerank, f["query"], f["documents"], f["top_n"],
                                      f["return_documents"], engine_client.tokenizer, lim)
        try:
            collectors = await run(request, norm, time.monotonic())
        except ClientDisconnected:
            return Response(status_code=499)
        scores = [checked(c.to_dict)["embedding"][0] for c in collectors]
        return json_response(rerank_results(scores, f["documents"], f["top_n"], f["return_documents"]))

    app.add_api_route("/encode", encode, methods=["POST"])
    app.add_api_route("/classify", encode, methods=["POST"])
    app.add_api_route("/v1/score", score, methods=["POST"])
    app.add_api_route("/v1/rerank", rerank, methods=["POST"])
