"""Bodies of the Scoring routes (/encode, /classify, /v1/score, /v1/rerank): which fields exist and their
defaults. Values are checked by runtime/scoring_input.py (shared with the Engine); this module refuses
unknown fields, so a typo is a 400 naming it rather than a silently ignored option.
"""

from __future__ import annotations

from typing import Any

from rollout.server.schemas import SGLANG_IGNORED_FIELDS, SGLANG_UNSUPPORTED_FIELDS, BadRequest, check_ints, short
from rollout.server.sglang_fields import accepts_default

ENCODE_FIELDS = {"text": None, "input_ids": None, "rid": None}
SCORE_FIELDS = {"query": None, "items": None, "label_token_ids": None, "apply_softmax": False,
                "item_first": False, "model": None, "user": None}
RERANK_FIELDS = {"query": None, "documents": None, "top_n": None, "return_documents": True, "model": None,
                 "user": None}


def _fields(route: str, body: dict[str, Any], known: dict[str, Any]) -> dict[str, Any]:
    for key, value in body.items():
        if key in known or key in SGLANG_IGNORED_FIELDS:
            continue
        if key in SGLANG_UNSUPPORTED_FIELDS:
            if not accepts_default(key, value):
                raise BadRequest(f"{key} is not supported by {route}, got {key}={short(value)}.")
            continue
        raise BadRequest(f"Unknown field in the {route} body: {key}={short(value)}.")
    check_ints(route, {k: body[k] for k in known if k in body})  # msgpack carries 64-bit integers only
    return {k: body.get(k, default) for k, default in known.items()}


def parse_encode(body: dict[str, Any], route: str) -> dict[str, Any]:
    return _fields(route, body, ENCODE_FIELDS)


def parse_score(body: dict[str, Any]) -> dict[str, Any]:
    fields = _fields("/v1/score", body, SCORE_FIELDS)
    if fields["label_token_ids"] is None:
        raise BadRequest("label_token_ids is required: the token ids whose probabilities are the scores.")
    return fields


def parse_rerank(body: dict[str, Any]) -> dict[str, Any]:
    return _fields("/v1/rerank", body, RERANK_FIELDS)
