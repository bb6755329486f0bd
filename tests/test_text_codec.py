"""TextCodec gives exactly the tokenizer's own ids and text, inline, on its threads and in its tokenizer
process, for a byte-level BPE tokenizer (SmolLM2) and a WordPiece one that cleans up spaces (MiniLM);
and the longest-token bound really bounds the characters a token covers."""

from __future__ import annotations

import asyncio

import pytest
from transformers import AutoTokenizer

from rollout.server.text_codec import INLINE_CHARS, NO_BOUND, TextCodec, longest_token_chars
from runtime.default_model import default_model_path
from tests.scoring_models import minilm_path

TEXTS = ["Hello world", "<|im_start|>user\nhi<|im_end|>", "  spaces  and\ttabs ", "é漢字🙂 mixed, punctuation!",
         "", "[CLS] already [SEP] there", "don't stop - it's fine ."]


@pytest.fixture(scope="module", params=["smollm2", "minilm"])
def tokenizer_path(request) -> str:
    return default_model_path() if request.param == "smollm2" else minilm_path()


def test_codec_matches_the_tokenizer(tokenizer_path):
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    codec = TextCodec(tok, tokenizer_path)
    big = " ".join(TEXTS) * (INLINE_CHARS // 40)  # over the inline size: goes to the tokenizer process

    async def check() -> None:
        for special in (True, False):
            want = [tok(t, add_special_tokens=special)["input_ids"] for t in TEXTS + [big]]
            assert [codec.encode(t, special) for t in TEXTS + [big]] == want
            assert await codec.encode_many(TEXTS, special) == want[:-1]
            assert await codec.encode_many(TEXTS + [big], special) == want
            raw, counts = await codec.tokenize_json(TEXTS + [big], special, single=False)
            assert counts == [len(w) for w in want]
            import json
            assert json.loads(bytes(raw)) == want
            raw, counts = await codec.tokenize_json([big], special, single=True)
            assert json.loads(bytes(raw)) == want[-1] and counts == [len(want[-1])]
        seqs = [tok(t)["input_ids"] for t in TEXTS] + [tok(big)["input_ids"]]
        for skip in (True, False):
            want_text = [tok.decode(s, skip_special_tokens=skip) for s in seqs]
            assert [codec.decode(s, skip) for s in seqs] == want_text
            assert await codec.decode_many(seqs, skip) == want_text
            assert await codec.decode_many(seqs[:-1], skip) == want_text[:-1]

    try:
        asyncio.run(check())
    finally:
        codec.close()


def test_longest_token_bounds_characters_per_token(tokenizer_path):
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    bound = longest_token_chars(tok)
    if tokenizer_path == minilm_path():  # WordPiece: a long word is one [UNK], so there is no bound
        assert bound == NO_BOUND
        assert len(tok("a" * 5000, add_special_tokens=False)["input_ids"]) == 1
        return
    assert 4 <= bound < 1000
    for text in TEXTS[:4] + ["a" * 5000, "\n" * 3000, " " * 4000 + "x", "🙂" * 500, "\x00\x01" * 900,
                             "".join(chr(c) for c in range(0x4E00, 0x4E00 + 3000))]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(text) <= len(ids) * bound, (text[:20], len(ids), bound)
