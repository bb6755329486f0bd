"""return_sampling_mask: per output token, the token ids the top-k / top-p / min-p truncation kept (SGLang's
meta_info["output_token_sampling_mask"]; null for a token whose distribution was not cut).

The oracle is a naive reference over the full distribution the server reports (return_logprob with
top_logprobs_num = the vocabulary): sort by probability, keep while the mass before a token is under
top_p, at most top_k, then drop those under min_p times the highest.
"""

from __future__ import annotations

import json
import math
import random
import re
from typing import Any

import pytest
import requests
import torch

from kernels.sampling import draw_tokens_torch
from kernels.sampling_support import truncation_support
from runtime.engine import Engine
from tests.helpers import ServerProcess

VOCAB = 49152


def naive_support(logprobs: list[tuple[float, int]], top_k: int = -1, top_p: float = 1.0,
                  min_p: float = 0.0) -> set[int]:
    entries = sorted(((math.exp(lp), t) for lp, t in logprobs), key=lambda e: (-e[0], e[1]))
    kept: list[tuple[float, int]] = []
    mass = 0.0
    for p, t in entries:
        if (top_k > 0 and len(kept) >= top_k) or (top_p < 1.0 and mass >= top_p) or p == 0.0:
            break
        kept.append((p, t))
        mass += p
    return {t for p, t in kept if p >= min_p * entries[0][0]}


@pytest.fixture(scope="module")
def model_dir(tiny_llm_dir: str) -> str:
    return tiny_llm_dir  # tests/conftest.py: the model tiny_llm_server serves


@pytest.fixture(scope="module")
def eng(model_dir: str):
    e = Engine(model_dir, max_total_tokens=4096, progress=False, device="cpu", dtype="float32")
    yield e
    e.shutdown()


def _run(eng: Engine, sp: dict[str, Any], **kw: Any) -> dict:
    return eng.generate("Once upon a time", sampling_params={"max_new_tokens": 6, "ignore_eos": True, **sp},
                        return_sampling_mask=True, **kw)


def test_top_k_mask_holds_the_sampled_token(eng: Engine):
    out = _run(eng, {"top_k": 5, "temperature": 1.0, "n": 3, "sampling_seed": 1})
    for o in out:
        masks = o["meta_info"]["output_token_sampling_mask"]
        assert len(masks) == len(o["output_ids"]) == 6
        for mask, token in zip(masks, o["output_ids"]):
            assert 1 <= len(mask) <= 5 and len(set(mask)) == len(mask)
            assert token in mask


@pytest.mark.parametrize("sp", [{"top_p": 0.6, "temperature": 0.5},
                                {"top_p": 0.9, "top_k": 40, "temperature": 0.3},
                                {"min_p": 0.3, "temperature": 0.2},
                                {"top_p": 0.7, "min_p": 0.2, "temperature": 0.3}])
def test_mask_equals_the_naive_truncation_of_the_reported_distribution(eng: Engine, sp: dict[str, Any]):
    out = _run(eng, {**sp, "sampling_seed": 5}, return_logprob=True, top_logprobs_num=VOCAB)
    meta = out["meta_info"]
    sizes = [len(m) for m in meta["output_token_sampling_mask"]]
    assert max(sizes) > 1 and min(sizes) < VOCAB // 2, sizes  # real cuts, not trivial ones
    for mask, full, token in zip(meta["output_token_sampling_mask"], meta["output_top_logprobs"],
                                 out["output_ids"]):
        expected = naive_support([(lp, t) for lp, t, _ in full], sp.get("top_k", -1), sp.get("top_p", 1.0),
                                 sp.get("min_p", 0.0))
        assert set(mask) == expected
        assert token in mask
        # Most probable first.
        lp = {t: v for v, t, _ in full}
        assert [lp[t] for t in mask] == sorted((lp[t] for t in mask), reverse=True)


def test_without_truncation_the_mask_is_null(eng: Engine):
    out = _run(eng, {"temperature": 1.0, "sampling_seed": 2})
    assert out["meta_info"]["output_token_sampling_mask"] == [None] * 6


def test_greedy_mask_is_the_token(eng: Engine):
    out = _run(eng, {"temperature": 0.0})
    assert out["meta_info"]["output_token_sampling_mask"] == [[t] for t in out["output_ids"]]


def test_mask_does_not_change_the_tokens(eng: Engine):
    sp = {"top_p": 0.8, "top_k": 20, "temperature": 0.8, "sampling_seed": 9, "max_new_tokens": 8}
    with_mask = eng.generate("Hello", sampling_params=sp, return_sampling_mask=True, return_logprob=True)
    without = eng.generate("Hello", sampling_params=sp, return_logprob=True)
    assert with_mask["output_ids"] == without["output_ids"]
    assert "output_token_sampling_mask" not in without["meta_info"]


def test_mask_within_a_grammar(eng: Engine):
    """With a grammar the support is the truncation of the grammar-masked distribution."""
    out = eng.generate("Mail:", sampling_params={"regex": r"[a-z]{3,6}@x\.com", "top_k": 3, "sampling_seed": 4,
                                                 "max_new_tokens": 30}, return_sampling_mask=True)
    assert re.fullmatch(r"[a-z]{3,6}@x\.com", out["text"])
    for mask, token in zip(out["meta_info"]["output_token_sampling_mask"], out["output_ids"]):
        assert token in mask and len(mask) <= 3
    out = eng.generate("Mail:", sampling_params={"regex": r"(yes|no)", "sampling_seed": 4},
                       return_sampling_mask=True)
    first = out["meta_info"]["output_token_sampling_mask"][0]  # no truncation, but the grammar cut it
    assert first is not None and 0 < len(first) < 100
    assert all("yes".startswith(eng.tokenizer.decode([t])) or "no".startswith(eng.tokenizer.decode([t]))
               for t in first)


def test_truncation_support_holds_every_draw():
    """The support rule is the draw's rule: over many uniforms every drawn token is in it, and ties at the
    cut keep the lowest ids (a stable sort), as draw_tokens does."""
    gen = torch.Generator().manual_seed(0)
    for case in range(6):
        vocab = 300
        logits = torch.randn(vocab, generator=gen) * 2
        if case % 2:
            logits[::7] = 1.5  # many ties
        probs = torch.softmax(logits, dim=-1)
        top_k, top_p, min_p = random.Random(case).choice([(5, 1.0, 0.0), (vocab, 0.5, 0.0), (50, 0.9, 0.1),
                                                          (vocab, 1.0, 0.2), (7, 0.3, 0.0)])
        support = set(truncation_support(probs, top_k, top_p, min_p))
        u = (torch.arange(400, dtype=torch.float64) + 0.5) / 400
        drawn = draw_tokens_torch(probs.repeat(400, 1), u, [top_k] * 400, [top_p] * 400, [min_p] * 400)
        assert set(drawn.tolist()) <= support
        # Every kept token of real mass is drawn by some uniform when the support is small.
        if len(support) <= 10:
            assert set(drawn.tolist()) == support
    ties = torch.tensor([0.1, 0.3, 0.2, 0.2, 0.2])
    assert truncation_support(ties, 2, 1.0, 0.0) == [1, 2]


# --- through a server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_llm_server: ServerProcess) -> ServerProcess:
    return tiny_llm_server  # tests/conftest.py: one server for the modules that only read from it


def test_server_returns_the_mask(server: ServerProcess):
    body = {"text": "Once", "sampling_params": {"top_k": 4, "max_new_tokens": 5, "ignore_eos": True}}
    r = requests.post(server.url + "/generate", json={**body, "return_sampling_mask": True}, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    for mask, token in zip(out["meta_info"]["output_token_sampling_mask"], out["output_ids"]):
        assert token in mask and len(mask) <= 4
    r = requests.post(server.url + "/generate", json={**body, "return_sampling_mask": False}, timeout=120)
    assert r.status_code == 200 and "output_token_sampling_mask" not in r.json()["meta_info"]
    r = requests.post(server.url + "/generate", json={**body, "return_sampling_mask": "yes"}, timeout=120)
    assert r.status_code == 400 and "return_sampling_mask" in r.json()["error"]["message"]
    r = requests.post(server.url + "/generate", json={**body, "return_sampling_mask": True, "stream": True},
                      timeout=120)
    assert r.status_code == 200
    chunks = [line for line in r.text.splitlines() if line.startswith("data: {")]
    last = json.loads(chunks[-1][6:])
    assert len(last["meta_info"]["output_token_sampling_mask"]) == len(last["output_ids"]) == 5
