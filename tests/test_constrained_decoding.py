"""Constrained decoding (sampling_params.regex / json_schema / ebnf) on a tiny random model with SmolLM2's
real tokenizer: a random model picks tokens almost at random, so only the grammar mask makes the outputs
well-formed. Checked through the Engine and a server: every output fully matches its regex, parses as JSON
that satisfies its schema, or derives from its EBNF; streaming, n > 1, retraction and the pause modes keep
the grammar's state; bad grammars are 400s naming the field.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from typing import Any

import pytest
import requests
import torch

from runtime.engine import Engine
from runtime.grammar import GrammarCache
from runtime.token_support import AllowedTokens
from tests.helpers import ServerProcess

EMAIL = r"[a-z]{3,8}@[a-z]{2,5}\.(com|org)"
YES_NO = r"(yes|no)"
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "pet": {"enum": ["cat", "dog"]},
                         "ok": {"type": "boolean"}},
          "required": ["name", "age", "pet", "ok"], "additionalProperties": False}
# Sums of single digits in parentheses: "(1+2+3)".
EBNF = 'root ::= "(" digit ("+" digit)* ")"\ndigit ::= [0-9]'
EBNF_AS_REGEX = r"\([0-9](\+[0-9])*\)"


def check_schema(value: Any) -> None:
    """SCHEMA's rules, by hand."""
    assert isinstance(value, dict) and set(value) == {"name", "age", "pet", "ok"}, value
    assert isinstance(value["name"], str) and len(value["name"]) <= 12
    assert isinstance(value["age"], int) and not isinstance(value["age"], bool) and 0 <= value["age"] <= 120
    assert value["pet"] in ("cat", "dog")
    assert isinstance(value["ok"], bool)


@pytest.fixture(scope="module")
def model_dir(tiny_llm_dir: str) -> str:
    return tiny_llm_dir  # tests/conftest.py: the model tiny_llm_server serves


@pytest.fixture(scope="module")
def eng(model_dir: str):
    e = Engine(model_dir, max_total_tokens=8192, progress=False, device="cpu", dtype="float32")
    yield e
    e.shutdown()


def _ends_by_grammar(out: dict) -> None:
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": 2}, out["meta_info"]["finish_reason"]


def test_regex_outputs_fully_match(eng: Engine):
    for regex in (YES_NO, EMAIL):
        outs = eng.generate("Write:", sampling_params={"regex": regex, "n": 4, "max_new_tokens": 64,
                                                       "sampling_seed": 7})
        for out in outs:
            assert re.fullmatch(regex, out["text"]), (regex, out["text"])
            _ends_by_grammar(out)
    # The unconstrained model at the same seed does not write e-mail addresses: the grammar made them.
    free = eng.generate("Write:", sampling_params={"n": 4, "max_new_tokens": 16, "sampling_seed": 7})
    assert not any(re.fullmatch(EMAIL, o["text"]) for o in free)


def test_json_schema_outputs_parse_and_validate(eng: Engine):
    outs = eng.generate(["JSON:", "Data:"], sampling_params={"json_schema": json.dumps(SCHEMA), "n": 2,
                                                             "max_new_tokens": 400, "sampling_seed": 3})
    assert len(outs) == 4
    for out in outs:
        _ends_by_grammar(out)
        check_schema(json.loads(out["text"]))
    # A schema object is taken as its JSON text.
    out = eng.generate("JSON:", sampling_params={"json_schema": SCHEMA, "max_new_tokens": 400, "sampling_seed": 4})
    check_schema(json.loads(out["text"]))


def test_ebnf_outputs_derive_from_grammar(eng: Engine):
    outs = eng.generate("Sum:", sampling_params={"ebnf": EBNF, "n": 3, "max_new_tokens": 64, "sampling_seed": 5})
    for out in outs:
        assert re.fullmatch(EBNF_AS_REGEX, out["text"]), out["text"]
        _ends_by_grammar(out)


def test_greedy_and_ignore_eos_still_end_with_the_grammar(eng: Engine):
    out = eng.generate("Answer:", sampling_params={"regex": YES_NO, "temperature": 0, "max_new_tokens": 16})
    assert re.fullmatch(YES_NO, out["text"])
    _ends_by_grammar(out)
    # ignore_eos: the grammar can take nothing after its stop token, so the request ends there anyway.
    out = eng.generate("Answer:", sampling_params={"regex": YES_NO, "ignore_eos": True, "max_new_tokens": 16})
    assert out["meta_info"]["finish_reason"]["type"] == "stop"
    assert re.fullmatch(YES_NO, out["text"])


def test_logprobs_are_of_the_masked_distribution(eng: Engine):
    """As SGLang: the grammar mask comes before the logprobs, so they renormalise over allowed tokens."""
    tok = eng.tokenizer
    out = eng.generate("Answer:", sampling_params={"regex": YES_NO, "max_new_tokens": 8, "sampling_seed": 1},
                       return_logprob=True, top_logprobs_num=50,
                       token_ids_logprob=tok.encode(" the") + tok.encode("Hello"))
    meta = out["meta_info"]
    first = meta["output_top_logprobs"][0]
    allowed = [(lp, t) for lp, t, _ in first if lp > -math.inf]
    assert 0 < len(allowed) < 50  # only prefixes of "yes" / "no" are possible
    assert math.isclose(sum(math.exp(lp) for lp, _ in allowed), 1.0, rel_tol=1e-4)
    for _, t in allowed:
        piece = tok.decode([t])
        assert "yes".startswith(piece) or "no".startswith(piece), piece
    assert all(lp == -math.inf for lp, _, _ in meta["output_token_ids_logprobs"][0])
    chosen = meta["output_token_logprobs"][0]
    assert chosen[0] > -math.inf and chosen[1] == out["output_ids"][0]


def test_constrained_rows_leave_other_rows_unchanged(eng: Engine):
    """The mask touches constrained rows only: an unconstrained request gets the same tokens (and logprobs)
    alone and batched with constrained ones."""
    sp = {"max_new_tokens": 12, "sampling_seed": 11, "ignore_eos": True}
    alone = eng.generate("Story:", sampling_params=sp, return_logprob=True)
    mixed = eng.generate(["Story:", "Answer:", "Mail:"],
                         sampling_params=[sp, {"regex": YES_NO, "max_new_tokens": 8},
                                          {"regex": EMAIL, "max_new_tokens": 40}], return_logprob=True)
    assert mixed[0]["output_ids"] == alone["output_ids"]
    assert [x[0] for x in mixed[0]["meta_info"]["output_token_logprobs"]] == \
        pytest.approx([x[0] for x in alone["meta_info"]["output_token_logprobs"]], abs=1e-5)
    assert re.fullmatch(YES_NO, mixed[1]["text"]) and re.fullmatch(EMAIL, mixed[2]["text"])


def test_streaming_keeps_the_grammar(eng: Engine):
    chunks = list(eng.generate("Mail:", sampling_params={"regex": EMAIL, "n": 2, "max_new_tokens": 40,
                                                         "sampling_seed": 2}, stream=True))
    last = {c["index"]: c for c in chunks}
    assert sorted(last) == [0, 1] and len(chunks) > 2
    for c in last.values():
        assert re.fullmatch(EMAIL, c["text"])
        _ends_by_grammar(c)


def test_bad_grammars_are_value_errors_naming_the_field(eng: Engine):
    cases = [({"regex": "(ab"}, "sampling_params.regex"),
             ({"json_schema": "{not json"}, "sampling_params.json_schema"),
             ({"json_schema": json.dumps({"type": "nonsense"})}, "sampling_params.json_schema"),
             ({"ebnf": 'start ::= "a"'}, "sampling_params.ebnf"),
             ({"regex": "a", "json_schema": "{}"}, "sampling_params.regex, sampling_params.json_schema"),
             ({"regex": "a", "min_new_tokens": 2}, "min_new_tokens"),
             ({"regex": 5}, "regex")]
    for sp, needle in cases:
        with pytest.raises(ValueError, match=re.escape(needle)):
            eng.generate("x", sampling_params={**sp, "max_new_tokens": 4})
    assert re.fullmatch(YES_NO, eng.generate("x", sampling_params={"regex": YES_NO})["text"])


def test_missing_xgrammar_or_tokenizer_is_a_clear_error(monkeypatch: pytest.MonkeyPatch):
    from runtime.generate_input import GenerateInput, normalize_generate
    from runtime.grammar import INSTALL_HINT

    inp = GenerateInput(input_ids=[5, 6, 7], sampling_params={"regex": YES_NO})
    with pytest.raises(ValueError, match="--skip-tokenizer-init"):
        normalize_generate(inp, None, 49152, 4096)
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # what `import xgrammar` sees when it is not installed
    with pytest.raises(ValueError, match=re.escape(INSTALL_HINT)):
        normalize_generate(inp, lambda text: [5], 49152, 4096)
    # Unconstrained requests never need it.
    assert len(normalize_generate(GenerateInput(input_ids=[5]), None, 49152, 4096).requests) == 1


def test_grammar_cache_reuses_and_bounds(model_dir: str):
    from transformers import AutoTokenizer

    cache = GrammarCache(AutoTokenizer.from_pretrained(model_dir), 49152, {2}, capacity=2)
    first = cache.compiled("regex", YES_NO)
    assert cache.compiled("regex", YES_NO) is first and (cache.hits, cache.misses) == (1, 1)
    cache.compiled("ebnf", EBNF)
    cache.compiled("regex", YES_NO)           # most recently used: the ebnf one is the oldest now
    cache.compiled("regex", EMAIL)
    assert len(cache) == 2 and cache.compiled("regex", YES_NO) is first
    cache.compiled("ebnf", EBNF)
    assert cache.misses == 4                   # the ebnf grammar had been dropped and was compiled again
    with pytest.raises(ValueError, match="sampling_params.regex"):
        cache.compiled("regex", "(")


def test_allowed_tokens_apply_matches_a_torch_reference():
    """xgrammar's packed-bitmask kernel against unpacking the bits by hand: listed rows get -inf exactly
    where their bit is clear, other rows are untouched."""
    gen = torch.Generator().manual_seed(0)
    batch, vocab = 5, 1000  # not a multiple of 32: the last word is partial
    words = (vocab + 31) // 32
    bitmask = torch.randint(-(2**31), 2**31 - 1, (batch, words), dtype=torch.int32, generator=gen)
    logits = torch.randn(batch, vocab, generator=gen)
    rows = [0, 2, 3]
    ours = logits.clone()
    AllowedTokens(rows=rows, bitmask=bitmask).apply(ours)
    bits = ((bitmask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).reshape(batch, -1)[:, :vocab].bool()
    ref = logits.clone()
    for r in rows:
        ref[r] = ref[r].masked_fill(~bits[r], float("-inf"))
    assert torch.equal(ours, ref)


def test_retraction_keeps_the_matcher_state(model_dir: str, caplog: pytest.LogCaptureFixture):
    """Retracted requests recompute their KV and keep their output and grammar state: under tight memory
    (requests retracted midway through their output) the greedy outputs equal those of a roomy engine
    and still match."""
    caplog.set_level(logging.DEBUG, logger="runtime.scheduler")
    regex = r"(ab|cd|ef)(,(ab|cd|ef)){10,40}"
    prompts = [f"List number {i}: " + "word " * (6 + 5 * i) for i in range(6)]
    sp = {"regex": regex, "temperature": 0, "max_new_tokens": 100}
    kw = dict(progress=False, device="cpu", dtype="float32")
    with Engine(model_dir, max_total_tokens=8192, **kw) as roomy:
        ref = roomy.generate(prompts, sampling_params=sp)
        assert roomy.scheduler.num_retractions == 0
    with Engine(model_dir, context_length=160, max_total_tokens=200, chunked_prefill_size=64, **kw) as tight:
        out = tight.generate(prompts, sampling_params=sp)
        assert tight.scheduler.num_retractions > 0
    midway = [int(m.group(1)) for m in re.finditer(r"Retracted \S+ with (\d+) output tokens", caplog.text)]
    assert max(midway) > 0, midway
    assert [o["output_ids"] for o in out] == [r["output_ids"] for r in ref]
    for o in out:
        assert re.fullmatch(regex, o["text"]), o["text"]


@pytest.mark.parametrize("mode", ["retract", "in_place", "abort"])
def test_pause_modes_keep_the_grammar(eng: Engine, mode: str):
    regex = r"(ab|cd|ef)(,(ab|cd|ef)){20,30}"
    sp = {"regex": regex, "temperature": 0, "max_new_tokens": 120}
    ref = eng.generate("Pause:", sampling_params=sp)
    chunks = eng.generate("Pause:", sampling_params=sp, stream=True)
    first = next(chunks)
    assert eng.pause_generation(mode)[0]
    assert eng.update_weight_version(f"v-{mode}")[0]
    assert eng.continue_generation()[0]
    last = first
    for last in chunks:
        pass
    if mode == "abort":
        assert last["meta_info"]["finish_reason"]["type"] == "abort"
        assert ref["output_ids"][: len(last["output_ids"])] == last["output_ids"]
    else:
        assert last["output_ids"] == ref["output_ids"]
        assert re.fullmatch(regex, last["text"])


# --- through a server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_llm_server: ServerProcess) -> ServerProcess:
    return tiny_llm_server  # tests/conftest.py: one server for the modules that only read from it


def _post(server: ServerProcess, **body: Any) -> requests.Response:
    return requests.post(server.url + "/generate", json=body, timeout=120)


def test_server_regex_json_ebnf(server: ServerProcess):
    r = _post(server, text=["Mail:", "Hi:"], sampling_params={"regex": EMAIL, "n": 2, "max_new_tokens": 40})
    assert r.status_code == 200, r.text
    assert all(re.fullmatch(EMAIL, o["text"]) for o in r.json())
    r = _post(server, text="JSON:", sampling_params={"json_schema": json.dumps(SCHEMA), "max_new_tokens": 400})
    assert r.status_code == 200, r.text
    check_schema(json.loads(r.json()["text"]))
    r = _post(server, text="Sum:", sampling_params={"ebnf": EBNF, "max_new_tokens": 64}, stream=True)
    assert r.status_code == 200
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert re.fullmatch(EBNF_AS_REGEX, events[-1]["text"])


def test_server_bad_grammar_is_400_and_server_still_serves(server: ServerProcess):
    for sp, needle in [({"regex": "(ab"}, "sampling_params.regex"),
                       ({"json_schema": "{oops"}, "sampling_params.json_schema"),
                       ({"ebnf": "root ::= "}, "sampling_params.ebnf"),
                       ({"regex": "a", "ebnf": 'root ::= "a"'}, "sampling_params.regex, sampling_params.ebnf")]:
        r = _post(server, text="x", sampling_params=sp)
        assert r.status_code == 400, (sp, r.status_code, r.text)
        assert needle in r.json()["error"]["message"], r.text
    r = _post(server, text="x", sampling_params={"regex": YES_NO, "max_new_tokens": 8})
    assert r.status_code == 200 and re.fullmatch(YES_NO, r.json()["text"])
