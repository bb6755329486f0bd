"""`TextCodec`: the HTTP process's tokenizer calls, kept off the event loop for big inputs.

A tokenizer call on megabytes of text takes seconds. Run inline, it would freeze every route (/health
included). Run in a thread, it still holds the GIL for long stretches: the Rust `encode` / `decode` of
`tokenizers` keep it, and even the GIL-free `encode_batch` hands back millions of Python ints and drops
an Encoding with a string per token under the GIL (measured: ~0.2 s per 10 MB unloaded, 1.5 s on
busy cores, during which /health waits). So:
- big texts are tokenized (and big token lists decoded) in a tokenizer process of their own, started on
  first use, which answers ids as packed bytes and /tokenize's JSON ready-made;
- other blocking work on big inputs (the checks of /generate and the scoring routes) runs on a small
  thread pool, through `encode_batch` / `decode_batch`, which release the GIL while they work;
- small inputs (the common case) stay inline: a hop costs more than tokenizing a short prompt.
Both give exactly the tokenizer's own `__call__` / `decode` results (tests/test_text_codec.py).
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
from array import array
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, TypeVar

import msgspec

T = TypeVar("T")

# Inputs at most this many characters (or tokens, to decode) are handled inline on the event loop.
INLINE_CHARS = 16384
POOL_THREADS = 2


class TextCodec:
    def __init__(self, tokenizer: Any, tokenizer_path: str):
        self.tokenizer = tokenizer
        self.tokenizer_path = tokenizer_path
        # The Rust tokenizer of a "fast" tokenizer; None for a pure-Python one (then every call holds
        # the GIL and only runs in a thread).
        self.backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        self.max_chars_per_token = longest_token_chars(tokenizer)
        self._pool = ThreadPoolExecutor(max_workers=POOL_THREADS, thread_name_prefix="tokenizer")
        self._process: ProcessPoolExecutor | None = None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._process is not None:
            self._process.shutdown(wait=False, cancel_futures=True)

    # --- blocking calls (inline or on the pool) --------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """`tokenizer(text, add_special_tokens=...)["input_ids"]`, releasing the GIL where it can."""
        if self.backend is not None:
            return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """`tokenizer.decode(ids, skip_special_tokens=...)`, releasing the GIL where it gives the same text
        (the tokenizer's post-decode clean-up of spaces is Python: with it on, use the tokenizer itself)."""
        if self.backend is not None and not getattr(self.tokenizer, "clean_up_tokenization_spaces", False):
            return self.backend.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # --- async ------------------------------------------------------------------------------------

    async def in_process(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(tokenizer_path, *args)` in the tokenizer process (one worker: big inputs queue behind each
        other there, never in front of the event loop)."""
        if self._process is None:
            self._process = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._process, fn, self.tokenizer_path, *args)
        except BrokenProcessPool:  # the worker died (killed, out of memory): the next call starts another
            self._process = None
            raise RuntimeError("The tokenizer process died while handling this request.") from None

    async def encode_many(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each text; big inputs in the tokenizer process."""
        if total_chars(texts) <= INLINE_CHARS:
            return [self.encode(t, add_special_tokens) for t in texts]
        packed = await self.in_process(encode_packed, texts, add_special_tokens)
        return [array("i", p).tolist() for p in packed]

    async def tokenize_json(self, texts: list[str], add_special_tokens: bool,
                            single: bool) -> tuple[msgspec.Raw, list[int]]:
        """/tokenize's token lists as ready JSON (the first list alone when `single`), and their lengths;
        big inputs in the tokenizer process."""
        if total_chars(texts) <= INLINE_CHARS:
            tokens = [self.encode(t, add_special_tokens) for t in texts]
            return msgspec.Raw(msgspec.json.encode(tokens[0] if single else tokens)), [len(t) for t in tokens]
        data, counts = await self.in_process(encode_json, texts, add_special_tokens, single)
        return msgspec.Raw(data), counts

    async def decode_many(self, seqs: list[list[int]], skip_special_tokens: bool) -> list[str]:
        if sum(len(s) for s in seqs) <= INLINE_CHARS:
            return [self.decode(s, skip_special_tokens) for s in seqs]
        return await self.in_process(decode_all, seqs, skip_special_tokens)

    async def run(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)`: inline when `size` (characters or tokens of the input) is small, else on the pool."""
        if size <= INLINE_CHARS:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)


NO_BOUND = 1 << 30


def longest_token_chars(tokenizer: Any) -> int:
    """An upper bound on the characters of text one token covers (NO_BOUND when there is none).

    A BPE model turns every character into at least one piece (byte-level BPE spells one character per
    byte; otherwise an unknown character is one unknown token, unless `fuse_unk` joins them), so its
    longest vocabulary entry bounds the characters per token, and a text longer than
    `context_len * bound` cannot fit whatever it says. WordPiece (a word past 100 characters is one
    [UNK]) and Unigram (may fuse unknown runs) have no such bound: texts for them are never refused by
    length, only after tokenizing (in the tokenizer process)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    model = getattr(backend, "model", None)
    if type(model).__name__ != "BPE" or getattr(model, "fuse_unk", False):
        return NO_BOUND
    return max((len(piece) for piece in tokenizer.get_vocab()), default=1) or 1


def total_chars(text: Any) -> int:
    """Characters of a text or a list of texts (anything else counts 0: the schema check names it)."""
    if isinstance(text, str):
        return len(text)
    if isinstance(text, list):
        return sum(len(t) for t in text if isinstance(t, str))
    return 0


# --- the tokenizer process ----------------------------------------------------------------------------
# These run in the spawned worker, on the tokenizer's own API (no GIL to share there).


@functools.lru_cache(maxsize=2)
def _worker_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def encode_packed(path: str, texts: list[str], add_special_tokens: bool) -> list[bytes]:
    tok = _worker_tokenizer(path)
    return [array("i", tok(t, add_special_tokens=add_special_tokens)["input_ids"]).tobytes() for t in texts]


def encode_json(path: str, texts: list[str], add_special_tokens: bool, single: bool) -> tuple[bytes, list[int]]:
    tok = _worker_tokenizer(path)
    tokens = [tok(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]
    return msgspec.json.encode(tokens[0] if single else tokens), [len(t) for t in tokens]


def decode_all(path: str, seqs: list[list[int]], skip_special_tokens: bool) -> list[str]:
    tok = _worker_tokenizer(path)
    return [tok.decode(s, skip_special_tokens=skip_special_tokens) for s in seqs]
