"""The bad-input suite (issue 11): every route of the server (tests/bad_input_routes.py; a test checks that the
table holds every route of the app), 40+ classes of malformed input, against one real server on a tiny random
Llama with its tokenizer (so the text routes run) and, for the routes that need a scoring model, one on a tiny
cross-encoder.

For every case: no 5xx; an error is JSON `{"error": {"message"}}` (or the `{"success": false, "message"}` of the
weight routes, or OpenAI's `{"error": {"message", "type", "param", "code"}}` on the OpenAI routes) that names the
mutated field (or the body); and after each route's cases the server still answers its probe (a greedy
/generate, a rerank) exactly as before. Cases come from a table (body-level, field-level and query classes, a wrong method, a
body over the size limit, and targeted cases for bugs found by reading the routes) plus a `hypothesis` walk of
random JSON bodies per route, derandomized so every run sends the same bodies.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.bad_input_routes import OPENAI_SHAPE, SCORING_ROUTES, TARGETED, TARGETED_QUERY, app_routes, routes
from tests.helpers import ServerProcess, make_tiny_model_dir
from tests.scoring_models import make_tiny_cross_encoder_dir
from tests.server_checks import cpu_server

GREEDY = {"input_ids": [5, 6, 7, 8], "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}}
MAX_REQUEST_BYTES = 3 << 20  # small, so the size-limit class costs little; every other class fits under it
# Routes the route-table test does not require a row for (none: every route is walked).
NOT_WALKED: set[tuple[str, str]] = set()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-bad-input"), context_length=512)


def greedy_ids(server: ServerProcess) -> list[int]:
    resp = server.post("/generate", json=GREEDY)
    assert resp.status_code == 200, resp.text
    return resp.json()["output_ids"]


def encoder_scores(server: ServerProcess) -> list[tuple[int, float]]:
    resp = server.post("/v1/rerank", json={"query": "plants", "documents": ["leaves", "cars"],
                                           "return_documents": False})
    assert resp.status_code == 200, resp.text
    return [(r["index"], r["score"]) for r in resp.json()]


@pytest.fixture(scope="module")
def server(model_dir: str, tmp_path_factory: pytest.TempPathFactory):
    log = str(tmp_path_factory.mktemp("bad-input-log") / "server.log")
    # --max-n 8: a case that turns out valid asks for few samples (n over it is a 400, as over 1024 by default)
    with cpu_server(model_dir, "--max-total-tokens", "8000", "--request-read-timeout", "5", "--enable-metrics",
                    "--max-n", "8", "--max-request-bytes", str(MAX_REQUEST_BYTES), log_path=log) as proc:
        proc.probe = greedy_ids
        proc.reference = greedy_ids(proc)
        yield proc


@pytest.fixture(scope="module")
def scoring_server(tmp_path_factory: pytest.TempPathFactory):
    """A tiny cross-encoder with --is-embedding: the routes that only parse their bodies on a scoring server."""
    path = make_tiny_cross_encoder_dir(tmp_path_factory.mktemp("tiny-bad-input-ce"))
    log = str(tmp_path_factory.mktemp("bad-input-ce-log") / "server.log")
    with cpu_server(path, "--max-total-tokens", "8000", "--is-embedding", "--request-read-timeout", "5",
                    "--max-request-bytes", str(MAX_REQUEST_BYTES), log_path=log) as proc:
        proc.probe = encoder_scores
        proc.reference = encoder_scores(proc)
        yield proc


# Fields whose every value is accepted or whose absence means a long default (a 300 s group join).
NOT_MUTATED = {"/init_weights_update_group": {"timeout"}}

# --- the classes ------------------------------------------------------------------------------------
# Body-level: (name, raw body, content type). The error must name the body (or JSON) when it is a 4xx.
JSON = "application/json"
BODY_CLASSES: list[tuple[str, bytes, str]] = [
    ("not json", b"hello there", JSON),
    ("truncated json", b'{"text": "a', JSON),
    ("json array", b"[1, 2, 3]", JSON),
    ("json string", b'"text"', JSON),
    ("json number", b"42", JSON),
    ("json null", b"null", JSON),
    ("nan literal", b'{"x": NaN}', JSON),
    ("infinity literal", b'{"x": Infinity}', JSON),
    ("number beyond float", b'{"x": 1e999}', JSON),
    ("invalid utf-8", b'{"text": "\xff\xfe\xfa"}', JSON),
    ("utf-8 bom", b'\xef\xbb\xbf{"text": "a"}', JSON),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, JSON),
    ("deep object nesting", b'{"a":' * 2000 + b"1" + b"}" * 2000, JSON),
    ("huge top-level array", b"[" + b"1," * 1_000_000 + b"1]", JSON),
    ("form encoded", b"text=hello&rid=1", "application/x-www-form-urlencoded"),
    ("xml", b"<generate><text>hi</text></generate>", "application/xml"),
    ("binary zeros", b"\x00" * 1000, "application/octet-stream"),
    ("trailing garbage", b'{"text": "a"} xyz', JSON),
    ("single quotes", b"{'text': 'a'}", JSON),
    ("empty body", b"", JSON),
    ("whitespace body", b" \n\t ", JSON),
    ("no content type", b'{"zz_unknown": 1}', ""),
    ("over the size limit", b" " * (MAX_REQUEST_BYTES + 1), JSON),
]

# Field-level: (name, value). Each replaces one field of a valid body (or one sampling parameter).
FIELD_CLASSES: list[tuple[str, Any]] = [
    ("null", None), ("string", "not-a-number"), ("empty string", ""), ("int", 7), ("negative int", -5),
    ("huge int", 2**70), ("huge negative int", -(2**70)), ("float", 1.5), ("negative float", -1e30),
    ("tiny float", 1e-320), ("true", True), ("false", False), ("empty list", []), ("list of nulls", [None, None]),
    ("nested lists", [[[1]], [[2]]]), ("list of strings", ["a", "b"]), ("dict", {"a": 1}), ("empty dict", {}),
    ("numeric string", "5"), ("lone surrogate", "\ud800"), ("control chars", "\x00\x01\x1b[31m"),
    ("long string", "y" * 100_000), ("huge array", list(range(200_000))), ("unicode garbage", "\u202e\ufffd\U0001f4a9"),
    ("negative ids", [-1, -2**40]), ("int past 32 bits", 2**40), ("deeply nested value", json.loads("[" * 70 + "]" * 70)),
]
SHAPE_CLASSES = ["missing field", "duplicate key", "unknown key", "wrong method"]
# Query-level: (name, value). Each replaces one query parameter of a route that reads the query string.
QUERY_CLASSES: list[tuple[str, str]] = [
    ("empty", ""), ("word", "bogus"), ("negative", "-5"), ("nan", "nan"), ("infinity", "inf"), ("beyond float", "1e999"),
    ("superscript digit", "\u00b2"), ("huge int", "9" * 40), ("commas", ",,,"), ("control chars", "\x00\x1b[31m"),
    ("long", "y" * 4000), ("unicode", "\u202e\ufffd"),
]


def total_classes() -> int:
    return len(BODY_CLASSES) + len(FIELD_CLASSES) + len(SHAPE_CLASSES) + len(QUERY_CLASSES)


def field_cases(body: dict[str, Any], spread: int = 3) -> list[tuple[str, str, bytes]]:
    """(class, mutated field, raw body): every field (and sampling parameter) of a valid body goes missing,
    and every field class lands on `spread` fields (round robin), so each route sees every class."""
    out = []
    targets = [(k, None) for k in body] + [(k, "sampling_params") for k in body.get("sampling_params", {})]
    for j, (cls, value) in enumerate(FIELD_CLASSES):
        for r in range(min(spread, len(targets))):
            field, parent = targets[(j + r) % len(targets)]
            mutated = json.loads(json.dumps(body))
            (mutated[parent] if parent else mutated)[field] = value
            out.append((cls, field, json.dumps(mutated).encode()))
    for field, parent in targets:
        mutated = json.loads(json.dumps(body))
        del (mutated[parent] if parent else mutated)[field]
        out.append(("missing field", field, json.dumps(mutated).encode()))
    if body:
        first = next(iter(body))
        text = json.dumps(body)
        out.append(("duplicate key", first, (text[:-1] + f', "{first}": 12345}}').encode()))
    out.append(("unknown key", "zz_unknown", json.dumps({**body, "zz_unknown": [1, {"a": None}]}).encode()))
    return out


def error_message(resp: requests.Response) -> str | None:
    """The message of an error answer, or None when it is not in a JSON error shape."""
    try:
        data = resp.json()
    except ValueError:
        return None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return data["error"].get("message")
    if isinstance(data, dict) and data.get("success") is False:
        return data.get("message")
    return None


def send(server: ServerProcess, method: str, path: str, raw: bytes, ctype: str,
         query: dict[str, str] | None = None) -> requests.Response:
    headers = {"Content-Type": ctype} if ctype else {}
    return requests.request(method, server.url + path, data=raw, headers=headers, params=query, timeout=120)


def check(resp: requests.Response, where: str, names: Callable[[str], bool], path: str) -> None:
    assert resp.status_code < 500, (where, resp.status_code, resp.text[:400])
    if resp.status_code >= 400:
        message = error_message(resp)
        assert isinstance(message, str) and message, (where, resp.status_code, resp.text[:400])
        assert names(message), (where, message[:400])
    if resp.status_code == 400 and path in OPENAI_SHAPE:  # docs/api.md: OpenAI's shape, param naming the field
        error = resp.json()["error"]
        assert error.keys() >= {"message", "type", "param", "code"}, (where, error)
        assert error["type"] == "invalid_request_error" and error["code"] == 400, (where, error)


def restore(server: ServerProcess, model_dir: str, weights: bool = False) -> None:
    """Undo what a case that turned out valid may have changed: paused generation, released memory (on
    the CPU released weights are dropped, so they are loaded again from disk)."""
    requests.post(server.url + "/continue_generation", json={}, timeout=120)
    requests.post(server.url + "/resume_memory_occupation", json={}, timeout=120)
    if weights:
        resp = requests.post(server.url + "/update_weights_from_disk", json={"model_path": model_dir}, timeout=300)
        assert resp.status_code == 200, resp.text


def still_serves(server: ServerProcess, where: str) -> None:
    """The server answers its probe (a greedy /generate, or a rerank) exactly as before the cases."""
    assert server.probe(server) == server.reference, where


def names_body(message: str) -> bool:
    lowered = message.lower()
    return any(w in lowered for w in ("body", "json", "required", "must", "either text", "nested", "not supported",
                                      "needs", "embedding", "cross-encoder", "unknown field"))


def names_field(message: str, field: str, resp: requests.Response) -> bool:
    """A field error names the field (`items[0]`-style or singular counts; on an OpenAI route, `param`). A
    weight route's body that passed the schema and failed to apply answers `{"success": false}` in API.md's
    fixed wording, which names what it could not use (the path, the group, the rank) rather than the field."""
    if field.rstrip("s") in message or names_body(message) or (field == "zz_unknown" and "Unknown" in message):
        return True
    body = resp.json()
    if isinstance(body, dict) and isinstance(body.get("error"), dict) and body["error"].get("param") == field:
        return True
    return failed_to_apply(resp)


def failed_to_apply(resp: requests.Response) -> bool:
    """A weight or control route's body that passed the schema and failed to apply: API.md's fixed wording."""
    body = resp.json()
    return isinstance(body, dict) and body.get("success") is False and str(body.get("message")).startswith("Failed to")


def test_there_are_at_least_40_classes():
    assert total_classes() >= 40, total_classes()


def test_every_route_of_the_app_is_walked(model_dir):
    """A route added to the app without a row in tests/bad_input_routes.py (or a row for a route that is gone)
    fails here, so the walk cannot silently fall behind the server."""
    walked = {(path, method) for path, route in routes(model_dir).items() for method in route.methods}
    served = app_routes(model_dir)
    assert served - walked == NOT_WALKED, sorted(served - walked - NOT_WALKED)
    assert walked <= served, sorted(walked - served)


@pytest.mark.parametrize("path", list(routes("/m")))
def test_every_route_refuses_malformed_input(server, model_dir, path):
    walk(server, model_dir, path)


@pytest.mark.parametrize("path", SCORING_ROUTES)
def test_scoring_routes_on_a_scoring_server(scoring_server, model_dir, path):
    """On the generation server these routes refuse every body up front (wrong kind of model); here their
    parsers and checks run."""
    walk(scoring_server, model_dir, path)


def walk(server: ServerProcess, model_dir: str, path: str) -> None:
    """Every class that applies to the route's methods, bodies and query; then the server still serves."""
    route = routes(model_dir)[path]
    for method in route.methods:
        for cls, raw, ctype in BODY_CLASSES:
            resp = send(server, method, path, raw, ctype)
            check(resp, f"{method} {path} {cls}", lambda m, r=resp: names_body(m) or failed_to_apply(r), path)
    resp = send(server, "DELETE", path, b"{}", JSON)
    assert resp.status_code == 405 and error_message(resp), (path, resp.status_code, resp.text[:400])
    skip = NOT_MUTATED.get(path, set())
    for body in route.bodies if route.methods[0] != "GET" else ():  # GET-only routes read no body
        for cls, field, raw in field_cases(body):
            if field in skip:
                continue
            resp = send(server, route.methods[0], path, raw, JSON)  # a query would override /flush_cache's body
            check(resp, f"{path} {field}={cls}", lambda m, f=field, r=resp: names_field(m, f, r), path)
            # A refused case changed nothing (were it otherwise, the next cases' answers and still_serves
            # would show it); an accepted one may have paused generation or released the weights.
            if path in ("/pause_generation", "/release_memory_occupation") and resp.status_code < 400:
                restore(server, model_dir, weights=path == "/release_memory_occupation")
    for param in route.query:
        for cls, value in QUERY_CLASSES:
            resp = send(server, route.methods[0], path, b"", JSON, {**route.query, param: value})
            check(resp, f"{path} ?{param}={cls}", lambda m, p=param: p in m, path)
    restore(server, model_dir)
    still_serves(server, path)


@pytest.mark.parametrize("path", sorted(set(TARGETED) | set(TARGETED_QUERY)))
def test_targeted_cases_are_400s_naming_the_field(server, path):
    """Requests that reached a 5xx (or were served when they should not be) before the fixes: each is a 400
    naming the field; OpenAI routes set `param` to it."""
    method = routes("/m")[path].methods[0]
    for cls, field, body in TARGETED.get(path, []):
        resp = send(server, method, path, json.dumps(body).encode(), JSON)
        assert resp.status_code == 400, (path, cls, resp.status_code, resp.text[:400])
        check(resp, f"{path} {cls}", lambda m, f=field: f in m, path)
        if path in OPENAI_SHAPE:
            assert resp.json()["error"]["param"] == field, (path, cls, resp.json())
    for cls, param, query in TARGETED_QUERY.get(path, []):
        resp = send(server, method, path, b"", JSON, {**routes("/m")[path].query, **query})
        assert resp.status_code == 400, (path, cls, resp.status_code, resp.text[:400])
        check(resp, f"{path} {cls}", lambda m, p=param: p in m, path)
    still_serves(server, path)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=4), max_leaves=12)


@pytest.mark.parametrize("path", ["/generate", "/tokenize", "/detokenize", "/v1/score", "/get_weights_by_name",
                                  "/update_weight_version", "/update_weights_from_tensor", "/abort_request",
                                  "/v1/completions", "/v1/chat/completions", "/v1/tokenize", "/v1/detokenize"])
def test_random_bodies_never_5xx(server, model_dir, path):
    random_walk(server, model_dir, path)


@pytest.mark.parametrize("path", SCORING_ROUTES)
def test_random_bodies_never_5xx_on_a_scoring_server(scoring_server, model_dir, path):
    random_walk(scoring_server, model_dir, path)


def random_walk(server: ServerProcess, model_dir: str, path: str) -> None:
    valid = routes(model_dir)[path].bodies
    fields = sorted({k for body in valid for k in body}) + ["sampling_params"] * (path == "/generate")

    @settings(max_examples=15, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.dictionaries(st.sampled_from(fields), JSON_VALUES, max_size=len(fields)))
    def one(body: dict) -> None:
        if path == "/v1/chat/completions":
            body.setdefault("max_tokens", 2)  # unset means up to the context: slow, and not what is tested
        resp = requests.post(server.url + path, json=body, timeout=120)
        assert resp.status_code < 500, (body, resp.status_code, resp.text[:300])
        if resp.status_code >= 400:
            assert error_message(resp), (body, resp.text[:300])

    one()
    restore(server, model_dir)
    still_serves(server, path)
