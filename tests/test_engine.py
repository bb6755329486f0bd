"""Engine.generate against the response contract of ../shared/API.md ("Generation").

Shapes and keys of the answer, finish reasons, logprob invariants, n > 1 ordering and rids, seeds,
stop conditions, streaming, asyncio, argument validation (with the API.md messages) and aborts.
A tiny random Llama runs without a tokenizer; a second one carries the SmolLM2 tokenizer (vocab 49152)
for text, stop strings and text in logprobs; the real SmolLM2 runs once as @slow.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from runtime.engine import Engine

CONTEXT = 256
EOS = 2  # tiny_model_dir's eos_token_id
GREEDY = {"temperature": 0.0}
PROMPT = [5, 17, 99, 42, 7, 200, 31, 64, 128, 3]
PROMPT2 = [9, 8, 77, 66, 55, 150, 151]

BASE_META = {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "weight_version",
             "e2e_latency"}
LOGPROB_META = {"input_token_logprobs", "output_token_logprobs", "output_token_weight_versions"}
TOP_META = {"input_top_logprobs", "output_top_logprobs"}
IDS_META = {"input_token_ids_logprobs", "output_token_ids_logprobs"}


@pytest.fixture(scope="module")
def eng(tiny_model_dir):
    e = Engine(tiny_model_dir("llama"), skip_tokenizer_init=True, max_total_tokens=4096, progress=False,
               device="cpu", dtype="float32")
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def tok_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """A tiny random Llama with the SmolLM2 vocabulary, saved next to the SmolLM2 tokenizer."""
    from runtime.default_model import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    src = Path(tiny_model_dir("llama", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id))
    dst = tmp_path_factory.mktemp("tiny-llama-smollm2-tokenizer")
    for f in src.iterdir():
        shutil.copy(f, dst / f.name)
    tokenizer.save_pretrained(str(dst))
    return str(dst)


@pytest.fixture(scope="module")
def tok_eng(tok_model_dir):
    e = Engine(tok_model_dir, max_total_tokens=4096, progress=False, device="cpu", dtype="float32")
    yield e
    e.shutdown()


def _greedy_ids(eng: Engine, prompt: list[int], n: int, **sp: Any) -> list[int]:
    return eng.generate(input_ids=prompt, sampling_params={**GREEDY, "ignore_eos": True, "max_new_tokens": n,
                                                           **sp})["output_ids"]


# --- response shape -------------------------------------------------------------------------------


def test_plain_response_shape(eng):
    out = eng.generate(input_ids=PROMPT, sampling_params={**GREEDY, "max_new_tokens": 6, "ignore_eos": True})
    assert isinstance(out, dict)
    assert set(out) == {"output_ids", "meta_info"}  # no "text" with skip_tokenizer_init
    meta = out["meta_info"]
    assert set(meta) == BASE_META
    assert isinstance(meta["id"], str) and meta["id"]
    assert meta["finish_reason"] == {"type": "length", "length": 6}
    assert meta["prompt_tokens"] == len(PROMPT)
    assert meta["completion_tokens"] == len(out["output_ids"]) == 6
    assert all(isinstance(t, int) and 0 <= t < 256 for t in out["output_ids"])
    assert isinstance(meta["cached_tokens"], int) and 0 <= meta["cached_tokens"] < len(PROMPT)
    assert meta["weight_version"] == "default"
    assert isinstance(meta["e2e_latency"], float) and meta["e2e_latency"] > 0


def test_text_response_shape(tok_eng):
    out = tok_eng.generate(prompt="Hello there, how are", sampling_params={**GREEDY, "max_new_tokens": 5,
                                                                           "ignore_eos": True})
    assert set(out) == {"text", "output_ids", "meta_info"}
    assert set(out["meta_info"]) == BASE_META
    assert out["text"] == tok_eng.tokenizer.decode(out["output_ids"], skip_special_tokens=True)
    assert out["meta_info"]["prompt_tokens"] == len(tok_eng.tokenizer("Hello there, how are")["input_ids"])
    batch = tok_eng.generate(prompt=["a b c", "one two"], sampling_params={"max_new_tokens": 2})
    assert isinstance(batch, list) and len(batch) == 2 and all("text" in o for o in batch)


@pytest.mark.parametrize("top_k", [0, 3])
@pytest.mark.parametrize("token_ids", [None, [7, 3, 200, EOS]])
@pytest.mark.parametrize("start", [-1, 0, 4, len(PROMPT) - 1])
def test_logprob_response_shape(eng, top_k, token_ids, start):
    out = eng.generate(input_ids=PROMPT, sampling_params={**GREEDY, "max_new_tokens": 5, "ignore_eos": True},
                       return_logprob=True, logprob_start_len=start, top_logprobs_num=top_k,
                       token_ids_logprob=token_ids)
    meta = out["meta_info"]
    want = BASE_META | LOGPROB_META | (TOP_META if top_k else set()) | (IDS_META if token_ids else set())
    assert set(meta) == want
    ids = out["output_ids"]
    outs = meta["output_token_logprobs"]
    assert len(outs) == meta["completion_tokens"] == len(ids) == 5
    assert [t for _, t, _ in outs] == ids
    assert all(isinstance(lp, float) and lp <= 0 and txt is None for lp, _, txt in outs)
    assert meta["output_token_weight_versions"] == ["default"] * 5

    inputs = meta["input_token_logprobs"]
    if start < 0:
        assert inputs == []
    else:
        assert len(inputs) + start == meta["prompt_tokens"] == len(PROMPT)
        assert [t for _, t, _ in inputs] == PROMPT[start:]
        assert inputs[0][0] is None
        assert all(isinstance(lp, float) and lp <= 0 for lp, _, _ in inputs[1:])

    if top_k:
        tops = meta["output_top_logprobs"]
        assert len(tops) == 5
        for (lp, tok, _), top in zip(outs, tops):
            assert len(top) == top_k
            values = [v for v, _, _ in top]
            assert values == sorted(values, reverse=True)
            assert top[0][:2] == [lp, tok]  # greedy: the chosen token is the most likely
        in_tops = meta["input_top_logprobs"]
        assert len(in_tops) == len(inputs)
        if in_tops:
            assert in_tops[0] is None
            assert all(len(row) == top_k for row in in_tops[1:])
    if token_ids:
        for key, chosen in (("output_token_ids_logprobs", outs), ("input_token_ids_logprobs", inputs)):
            rows = meta[key]
            assert len(rows) == len(chosen)
            for i, (row, (lp, tok, _)) in enumerate(zip(rows, chosen)):
                if row is None:
                    assert key.startswith("input") and i == 0
                    continue
                assert [t for _, t, _ in row] == token_ids  # the order asked for
                by_id = {t: v for v, t, _ in row}
                if tok in by_id:
                    assert by_id[tok] == pytest.approx(lp, abs=1e-6)


def test_logprobs_are_consistent_between_prompt_and_output(eng):
    # No ignore_eos or min_new_tokens: an EOS mask would make output logprobs those of a renormalized
    # distribution, which prompt logprobs (no mask) are not.
    out = eng.generate(input_ids=PROMPT, sampling_params={"temperature": 0.7, "max_new_tokens": 8,
                                                          "sampling_seed": 3},
                       return_logprob=True)
    assert len(out["output_ids"]) >= 3
    full = PROMPT + out["output_ids"]
    again = eng.generate(input_ids=full, sampling_params={"temperature": 0.7, "max_new_tokens": 0},
                         return_logprob=True, logprob_start_len=len(PROMPT))
    replay = [lp for lp, _, _ in again["meta_info"]["input_token_logprobs"][1:]]
    # Prompt positions len(PROMPT)+1.. are the output tokens 1..; the first output token follows position 0.
    assert replay == pytest.approx([lp for lp, _, _ in out["meta_info"]["output_token_logprobs"][1:]], abs=1e-4)


def test_return_text_in_logprobs(tok_eng):
    out = tok_eng.generate(prompt="The sky is", sampling_params={**GREEDY, "max_new_tokens": 4, "ignore_eos": True},
                           return_logprob=True, logprob_start_len=0, top_logprobs_num=2,
                           return_text_in_logprobs=True)
    meta = out["meta_info"]
    dec = tok_eng.tokenizer.decode
    for lp, tok, text in meta["output_token_logprobs"] + meta["input_token_logprobs"]:
        assert text == dec([tok])
    for row in meta["output_top_logprobs"]:
        assert all(text == dec([tok]) for _, tok, text in row)


# --- finish reasons and stop conditions ----------------------------------------------------------


def test_stop_token_ids(eng):
    ref = _greedy_ids(eng, PROMPT, 20)
    k = next(i for i in range(2, 20) if ref[i] not in ref[:i] and ref[i] != EOS)
    out = eng.generate(input_ids=PROMPT, sampling_params={**GREEDY, "max_new_tokens": 20, "ignore_eos": True,
                                                          "stop_token_ids": [ref[k]]}, return_logprob=True)
    assert out["output_ids"] == ref[:k + 1]  # the stop token stays in output_ids
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": ref[k]}
    assert out["meta_info"]["completion_tokens"] == len(out["meta_info"]["output_token_logprobs"]) == k + 1


def test_eos_min_new_tokens_and_ignore_eos(eng):
    force_eos = {**GREEDY, "max_new_tokens": 10, "logit_bias": {str(EOS): 100.0}}
    out = eng.generate(input_ids=PROMPT, sampling_params=force_eos)
    assert out["output_ids"] == [EOS]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS}

    out = eng.generate(input_ids=PROMPT, sampling_params={**force_eos, "min_new_tokens": 4})
    ids = out["output_ids"]
    assert len(ids) == 5 and EOS not in ids[:4] and ids[4] == EOS
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS}

    # ignore_eos: EOS does not end the request (whether it is also masked is the sampler's business).
    out = eng.generate(input_ids=PROMPT, sampling_params={**force_eos, "ignore_eos": True})
    assert len(out["output_ids"]) == 10
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 10}

    # min_new_tokens holds back stop_token_ids too.
    ref = _greedy_ids(eng, PROMPT, 12)
    stop = ref[1]
    out = eng.generate(input_ids=PROMPT, sampling_params={**GREEDY, "max_new_tokens": 12, "ignore_eos": True,
                                                          "stop_token_ids": [stop], "min_new_tokens": 6})
    assert stop not in out["output_ids"][:6]
    assert len(out["output_ids"]) >= 6


def test_max_new_tokens_zero_is_prefill_only(eng):
    out = eng.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                       logprob_start_len=0)
    meta = out["meta_info"]
    assert out["output_ids"] == [] and meta["completion_tokens"] == 0
    assert meta["finish_reason"] == {"type": "length", "length": 0}
    assert meta["output_token_logprobs"] == [] and meta["output_token_weight_versions"] == []
    assert len(meta["input_token_logprobs"]) == len(PROMPT)
    assert eng.scheduler.is_idle_clean()


def test_max_new_tokens_capped_by_context(eng):
    prompt = [11] * (CONTEXT - 3)
    out = eng.generate(input_ids=prompt, sampling_params={**GREEDY, "max_new_tokens": 50, "ignore_eos": True})
    assert len(out["output_ids"]) == 3
    assert out["meta_info"]["finish_reason"]["type"] == "length"


def _stop_string_case(tok_eng: Engine, prompt: str) -> tuple[list[int], int, str]:
    """A greedy output, an index k and a stop string that first appears in the text with token k."""
    tok = tok_eng.tokenizer
    ids = tok_eng.generate(prompt=prompt, sampling_params={**GREEDY, "max_new_tokens": 30,
                                                           "ignore_eos": True})["output_ids"]
    special = set(tok.all_special_ids)
    for k in range(2, len(ids)):
        if any(t in special for t in ids[:k + 1]):
            break
        before, upto = tok.decode(ids[:k]), tok.decode(ids[:k + 1])
        piece = upto[len(before):].strip()
        if upto.startswith(before) and len(piece) >= 2 and piece not in before and "\ufffd" not in upto:
            return ids, k, piece
    pytest.skip("no usable stop string in this random output")


def test_stop_strings_trim_and_no_stop_trim(tok_eng):
    tok = tok_eng.tokenizer
    ids, k, stop = _stop_string_case(tok_eng, "Once upon a time")
    sp = {**GREEDY, "max_new_tokens": 30, "ignore_eos": True, "stop": ["zzqqxx-never", stop]}
    out = tok_eng.generate(prompt="Once upon a time", sampling_params=sp)
    assert out["output_ids"] == ids[:k + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    full = tok.decode(ids[:k + 1])
    assert out["text"] == full[:full.find(stop)]
    assert stop not in out["text"]

    kept = tok_eng.generate(prompt="Once upon a time", sampling_params={**sp, "stop": stop, "no_stop_trim": True})
    assert kept["output_ids"] == ids[:k + 1]
    assert kept["text"] == full and kept["text"].endswith(stop)

    # A matched stop token is left out of the text (kept with no_stop_trim), but stays in output_ids.
    sp_tok = {**GREEDY, "max_new_tokens": 30, "ignore_eos": True, "stop_token_ids": [ids[k]]}
    out = tok_eng.generate(prompt="Once upon a time", sampling_params=sp_tok)
    if ids[k] not in ids[:k]:
        assert out["output_ids"] == ids[:k + 1]
        assert out["text"] == tok.decode(ids[:k])
        kept = tok_eng.generate(prompt="Once upon a time", sampling_params={**sp_tok, "no_stop_trim": True})
        assert kept["text"] == full


@pytest.mark.slow
def test_stop_string_on_smollm2():
    with Engine(max_total_tokens=2048, progress=False, device="cpu", dtype="float32") as e:
        prompt = "Count: one, two, three, four, five,"
        ref = e.generate(prompt=prompt, sampling_params={**GREEDY, "max_new_tokens": 12})
        assert "six" in ref["text"]
        out = e.generate(prompt=prompt, sampling_params={**GREEDY, "max_new_tokens": 12, "stop": "six"})
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": "six"}
        assert out["text"] == ref["text"][:ref["text"].find("six")]
        kept = e.generate(prompt=prompt, sampling_params={**GREEDY, "max_new_tokens": 12, "stop": "six",
                                                          "no_stop_trim": True})
        assert "six" in kept["text"]
        assert e.scheduler.is_idle_clean()


# --- n > 1, rids, seeds ---------------------------------------------------------------------------


def test_n_is_prompt_major_and_rids(eng):
    prompts = [PROMPT, PROMPT2]
    out = eng.generate(input_ids=prompts, sampling_params={"n": 3, "max_new_tokens": 4, "ignore_eos": True},
                       rid="batch")
    assert isinstance(out, list) and len(out) == 6
    assert [o["meta_info"]["id"] for o in out] == [f"batch_{i}_{j}" for i in range(2) for j in range(3)]
    assert [o["meta_info"]["prompt_tokens"] for o in out] == [len(PROMPT)] * 3 + [len(PROMPT2)] * 3

    single = eng.generate(input_ids=PROMPT, sampling_params={"n": 2, "max_new_tokens": 2}, rid="one")
    assert [o["meta_info"]["id"] for o in single] == ["one_0", "one_1"]

    out = eng.generate(input_ids=prompts, sampling_params={"max_new_tokens": 2}, rid="b")
    assert [o["meta_info"]["id"] for o in out] == ["b_0", "b_1"]
    out = eng.generate(input_ids=prompts, sampling_params={"max_new_tokens": 2}, rid=["x", "y"])
    assert [o["meta_info"]["id"] for o in out] == ["x", "y"]
    assert eng.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 1}, rid="solo")["meta_info"]["id"] == "solo"
    # A list of sampling params goes with the prompts, in order.
    out = eng.generate(input_ids=prompts, sampling_params=[{"max_new_tokens": 1}, {"max_new_tokens": 3,
                                                                                   "ignore_eos": True}])
    assert [len(o["output_ids"]) for o in out] == [1, 3]


def test_sampling_seed_is_batch_invariant(eng):
    sp = {"temperature": 1.0, "max_new_tokens": 16, "ignore_eos": True, "sampling_seed": 1234}
    alone = eng.generate(input_ids=PROMPT, sampling_params=sp)["output_ids"]
    others = [[i + 3] * (5 + i) for i in range(5)]
    batch = eng.generate(input_ids=others[:2] + [PROMPT] + others[2:],
                         sampling_params=[{"temperature": 1.0, "max_new_tokens": 16, "ignore_eos": True}] * 2
                         + [sp] + [{"temperature": 0.5, "top_p": 0.9, "max_new_tokens": 9}] * 3)
    assert batch[2]["output_ids"] == alone
    assert eng.generate(input_ids=PROMPT, sampling_params=sp)["output_ids"] == alone
    other_seed = eng.generate(input_ids=PROMPT, sampling_params={**sp, "sampling_seed": 4321})["output_ids"]
    assert other_seed != alone


def test_seeded_siblings_differ_and_reproduce(eng):
    """n > 1 with a seed: sample j uses seed + j, so the group is reproducible and its samples differ."""
    sp = {"temperature": 1.0, "max_new_tokens": 12, "ignore_eos": True, "sampling_seed": 50, "n": 3}
    group = [o["output_ids"] for o in eng.generate(input_ids=PROMPT, sampling_params=sp)]
    assert len({tuple(g) for g in group}) == 3
    assert [o["output_ids"] for o in eng.generate(input_ids=PROMPT, sampling_params=sp)] == group
    single = {**sp, "n": 1, "sampling_seed": 52}
    assert eng.generate(input_ids=PROMPT, sampling_params=single)["output_ids"] == group[2]


# --- streaming and asyncio ------------------------------------------------------------------------


def test_stream_chunks_are_cumulative(eng):
    ref = eng.generate(input_ids=PROMPT, sampling_params={**GREEDY, "max_new_tokens": 12, "ignore_eos": True},
                       return_logprob=True)
    chunks = list(eng.generate(input_ids=PROMPT, sampling_params={**GREEDY, "max_new_tokens": 12,
                                                                  "ignore_eos": True},
                               return_logprob=True, stream=True))
    assert len(chunks) >= 2
    prev: list[int] = []
    for c in chunks[:-1]:
        assert "index" not in c
        assert c["meta_info"]["finish_reason"] is None
        assert c["output_ids"][:len(prev)] == prev and len(c["output_ids"]) > len(prev)
        assert len(c["meta_info"]["output_token_logprobs"]) == len(c["output_ids"])
        prev = c["output_ids"]
    last = chunks[-1]
    assert last["meta_info"]["finish_reason"] == {"type": "length", "length": 12}
    assert last["output_ids"] == ref["output_ids"]
    assert [lp for lp, _, _ in last["meta_info"]["output_token_logprobs"]] == pytest.approx(
        [lp for lp, _, _ in ref["meta_info"]["output_token_logprobs"]], abs=1e-5)


def test_stream_batch_carries_index(eng):
    prompts = [PROMPT, PROMPT2]
    sp = [{**GREEDY, "max_new_tokens": 5, "ignore_eos": True}, {**GREEDY, "max_new_tokens": 8, "ignore_eos": True}]
    ref = eng.generate(input_ids=prompts, sampling_params=sp)
    last: dict[int, dict] = {}
    for c in eng.generate(input_ids=prompts, sampling_params=sp, stream=True):
        i = c["index"]
        if i in last:
            assert c["output_ids"][:len(last[i]["output_ids"])] == last[i]["output_ids"]
            assert last[i]["meta_info"]["finish_reason"] is None
        last[i] = c
    assert sorted(last) == [0, 1]
    assert [last[i]["output_ids"] for i in (0, 1)] == [r["output_ids"] for r in ref]
    assert all(last[i]["meta_info"]["finish_reason"]["type"] == "length" for i in (0, 1))

    n_last: dict[int, dict] = {}
    for c in eng.generate(input_ids=PROMPT, sampling_params={"n": 3, "max_new_tokens": 3, "ignore_eos": True},
                          stream=True, rid="sn"):
        n_last[c["index"]] = c
    assert {i: c["meta_info"]["id"] for i, c in n_last.items()} == {0: "sn_0", 1: "sn_1", 2: "sn_2"}


def test_async_generate_concurrent(eng):
    prompts = [PROMPT, PROMPT2, [4, 5, 6], [250, 251, 252, 253, 254]]
    sp = {**GREEDY, "max_new_tokens": 10, "ignore_eos": True}
    ref = eng.generate(input_ids=prompts, sampling_params=sp)

    async def main():
        async def stream_one():
            chunks = []
            async for c in await eng.async_generate(input_ids=PROMPT2, sampling_params=sp, stream=True):
                chunks.append(c)
            return chunks

        singles = [eng.async_generate(input_ids=p, sampling_params=sp) for p in prompts]
        batch = eng.async_generate(input_ids=prompts, sampling_params=sp)
        return await asyncio.gather(*singles, batch, stream_one())

    *singles, batch, chunks = asyncio.run(main())
    assert [s["output_ids"] for s in singles] == [r["output_ids"] for r in ref]
    assert [b["output_ids"] for b in batch] == [r["output_ids"] for r in ref]
    assert chunks[-1]["output_ids"] == ref[1]["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 10}
    assert eng.scheduler.is_idle_clean()


# --- validation -------------------------------------------------------------------------------------

BAD_SAMPLING = [
    ({"temperature": -0.5}, "temperature must be a non-negative finite number, got -0.5."),
    ({"temperature": float("inf")}, "temperature must be a non-negative finite number, got inf."),
    ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0."),
    ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5."),
    ({"min_p": -0.1}, "min_p must be in [0, 1], got -0.1."),
    ({"min_p": 1.1}, "min_p must be in [0, 1], got 1.1."),
    ({"top_k": 0}, "top_k must be -1 (disable) or at least 1, got 0."),
    ({"top_k": -2}, "top_k must be -1 (disable) or at least 1, got -2."),
    ({"frequency_penalty": 2.5}, "frequency_penalty must be in [-2, 2], got 2.5."),
    ({"frequency_penalty": -2.5}, "frequency_penalty must be in [-2, 2], got -2.5."),
    ({"presence_penalty": 3.0}, "presence_penalty must be in [-2, 2], got 3.0."),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be in (0, 2] (1.0 = no penalty), got 0.0."),
    ({"repetition_penalty": 2.5}, "repetition_penalty must be in (0, 2] (1.0 = no penalty), got 2.5."),
    ({"min_new_tokens": 5, "max_new_tokens": 3}, "min_new_tokens must be in [0, max_new_tokens], got 5."),
    ({"min_new_tokens": -1}, "min_new_tokens must be in [0, max_new_tokens], got -1."),
    ({"max_new_tokens": -1}, "max_new_tokens must be at least 0, got -1."),
]


@pytest.mark.parametrize("params,message", BAD_SAMPLING, ids=[m.split(" ")[0] + str(p) for p, m in BAD_SAMPLING])
def test_bad_sampling_params(eng, params, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        eng.generate(input_ids=PROMPT, sampling_params=params)
    # Also as one entry of a batch's list of sampling params.
    with pytest.raises(ValueError, match=re.escape(message)):
        eng.generate(input_ids=[PROMPT, PROMPT2], sampling_params=[{"max_new_tokens": 1}, params])
    _still_works(eng)


BAD_INPUTS = [
    (dict(), "Either text, input_ids or input_embeds should be provided."),
    (dict(prompt="hi", input_ids=PROMPT), "Either text, input_ids or input_embeds should be provided."),
    (dict(input_ids=[]), "input_ids cannot be empty."),
    (dict(input_ids=[PROMPT, []]), "input_ids cannot be empty."),
    (dict(input_ids=[5, 256, 7]), "input_ids contains token id 256"),
    (dict(input_ids=[5, -1]), "input_ids contains token id -1"),
    (dict(input_ids=[3] * CONTEXT), f"The input ({CONTEXT} tokens) is longer than the model's context length "
                                    f"({CONTEXT} tokens)."),
    (dict(input_ids=PROMPT, sampling_params={"foo": 1}), "sampling_params.foo"),
    (dict(input_ids=PROMPT, return_logprob=True, logprob_start_len=-2), "logprob_start_len"),
    (dict(input_ids=PROMPT, return_logprob=True, logprob_start_len=len(PROMPT)), "logprob_start_len"),
    (dict(input_ids=PROMPT, top_logprobs_num=-1), "top_logprobs_num"),
    (dict(input_ids=PROMPT, token_ids_logprob=[256]), "token_ids_logprob"),
    (dict(input_ids=PROMPT, sampling_params={"n": 0}), "n must be at least 1"),
    (dict(input_ids=[PROMPT, PROMPT2], rid=["a"]), "rid"),
    (dict(input_ids=[PROMPT, PROMPT2], rid=["a", "a"]), "Duplicate request ID"),
    (dict(input_ids=[PROMPT, PROMPT2], sampling_params=[{}]), "sampling_params"),
]


@pytest.mark.parametrize("kwargs,message", BAD_INPUTS, ids=[str(i) for i in range(len(BAD_INPUTS))])
def test_bad_inputs(eng, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        eng.generate(**kwargs)
    _still_works(eng)


def test_text_without_tokenizer_is_rejected(eng):
    with pytest.raises(ValueError, match="skip-tokenizer-init"):
        eng.generate(prompt="hello")
    _still_works(eng)


def test_duplicate_in_flight_rid(eng):
    it = eng.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 200, "ignore_eos": True},
                      stream=True, rid="busy")
    next(it)
    with pytest.raises(ValueError, match="Duplicate request ID rid='busy'"):
        eng.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 1}, rid="busy")
    it.close()  # stopping early aborts the request
    _wait_idle(eng)
    out = eng.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 1}, rid="busy")
    assert out["meta_info"]["id"] == "busy"


def _still_works(eng: Engine) -> None:
    out = eng.generate(input_ids=PROMPT2, sampling_params={"max_new_tokens": 2, "ignore_eos": True})
    assert len(out["output_ids"]) == 2
    assert eng.scheduler.is_idle_clean()


def _wait_idle(eng: Engine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while eng.scheduler.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not eng.scheduler.requests


# --- abort ------------------------------------------------------------------------------------------


def test_abort_streaming_request_mid_way(eng):
    sp = {**GREEDY, "max_new_tokens": 200, "ignore_eos": True}
    ref = _greedy_ids(eng, PROMPT, 200)
    last = None
    for chunk in eng.generate(input_ids=PROMPT, sampling_params=sp, stream=True, rid="to-abort",
                              return_logprob=True):
        last = chunk
        if len(chunk["output_ids"]) >= 3 and chunk["meta_info"]["finish_reason"] is None:
            eng.abort_request("to-abort")
    fr = last["meta_info"]["finish_reason"]
    assert fr["type"] == "abort" and isinstance(fr["message"], str) and fr["message"]
    ids = last["output_ids"]
    assert 3 <= len(ids) < 200
    assert ids == ref[:len(ids)]
    assert last["meta_info"]["completion_tokens"] == len(ids) == len(last["meta_info"]["output_token_logprobs"])
    assert eng.scheduler.is_idle_clean()


def test_abort_blocking_request_from_another_thread(eng):
    box: dict[str, Any] = {}
    sp = {**GREEDY, "max_new_tokens": CONTEXT - len(PROMPT) - 1, "ignore_eos": True}
    t = threading.Thread(target=lambda: box.setdefault("out", eng.generate(
        input_ids=[PROMPT, PROMPT2], sampling_params=sp, rid="blk")))
    t.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # wait until both requests have produced tokens
        reqs = list(eng.scheduler.requests.values())
        if len(reqs) == 2 and all(len(r.output_ids) >= 2 for r in reqs):
            break
        time.sleep(0.002)
    eng.abort_request("blk_1")
    t.join(timeout=30)
    assert not t.is_alive()
    first, second = box["out"]
    assert first["meta_info"]["finish_reason"]["type"] == "length"
    assert second["meta_info"]["finish_reason"]["type"] == "abort"
    assert 2 <= len(second["output_ids"]) < sp["max_new_tokens"]
    assert eng.scheduler.is_idle_clean()


def test_abort_prefix_and_all(eng):
    results: list[Any] = []
    sp = {"max_new_tokens": CONTEXT - len(PROMPT) - 1, "ignore_eos": True}
    threads = [threading.Thread(target=lambda r=r: results.append(eng.generate(input_ids=PROMPT, sampling_params=sp,
                                                                                 rid=r)))
               for r in ("grp-a", "grp-b", "other")]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(eng.scheduler.requests) < 3 and time.monotonic() < deadline:
        time.sleep(0.002)
    eng.abort_request("grp-")  # rid prefix
    deadline = time.monotonic() + 10
    while len(results) < 2 and time.monotonic() < deadline:
        time.sleep(0.002)
    assert sorted(r["meta_info"]["id"] for r in results) == ["grp-a", "grp-b"]
    eng.abort_request(abort_all=True)
    for t in threads:
        t.join(timeout=30)
    assert all(r["meta_info"]["finish_reason"]["type"] == "abort" for r in results)
    assert eng.scheduler.is_idle_clean()


def test_flush_cache(eng):
    eng.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 2})
    it = eng.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 200, "ignore_eos": True}, stream=True)
    next(it)
    assert not eng.flush_cache().success  # busy
    it.close()
    _wait_idle(eng)
    res = eng.flush_cache()
    assert res.success
    assert eng.scheduler.cache_manager.cached_tokens() == 0 and eng.scheduler.is_idle_clean()
    out = eng.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 2})
    assert out["meta_info"]["cached_tokens"] == 0
