"""`GenerateNormalizer`: a parsed /generate call tokenized and checked against the loaded model (vocab,
context length, routed experts), with big inputs off the event loop."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from rollout.server.engine_status import EngineStatus
from rollout.server.text_codec import INLINE_CHARS, TextCodec, total_chars
from runtime.generate_input import GenerateInput, NormalizedGenerate, check_routed_experts, normalize_generate


class GenerateNormalizer:
    def __init__(self, codec: TextCodec | None, has_routed_experts: bool, status: EngineStatus):
        self.codec = codec                      # None with --skip-tokenizer-init: token ids only
        self.has_routed_experts = has_routed_experts
        self.status = status

    def normalize(self, inp: GenerateInput) -> NormalizedGenerate:
        """Tokenize and check a /generate call (blocking: big inputs run it on the codec's threads)."""
        info = self.status.check_available()
        tokenize = None
        if self.codec is not None:
            self.check_text_length(inp.text)
            tokenize = self.codec.encode
        check_routed_experts(inp, self.has_routed_experts)
        return normalize_generate(inp, tokenize, info.vocab_size, info.context_len)

    async def normalize_async(self, inp: GenerateInput) -> NormalizedGenerate:
        """`normalize`, with big texts tokenized in the tokenizer process and big checks on a thread, so
        the event loop keeps serving."""
        size = total_chars(inp.text) + (len(inp.input_ids) if isinstance(inp.input_ids, list) else 0)
        if size <= INLINE_CHARS:
            return self.normalize(inp)
        if self.codec is None:  # --skip-tokenizer-init: only token ids to check, on a thread if many
            return await asyncio.to_thread(self.normalize, inp)
        text = inp.text
        self.check_text_length(text)  # refuse by length before paying for a tokenizer
        texts = text if isinstance(text, list) else [text]
        if inp.input_ids is None and texts and all(isinstance(t, str) for t in texts):
            ids = await self.codec.encode_many(texts)
            # The same call by token ids: normalize_generate treats both alike from here on.
            inp = dataclasses.replace(inp, text=None, input_ids=ids if isinstance(text, list) else ids[0])
        return await self.codec.run(size, self.normalize, inp)

    def check_text_length(self, text: Any) -> None:
        """A text longer than the context times the longest token cannot fit: ValueError without tokenizing."""
        info = self.status.info
        if self.codec is None or info is None:
            return
        cap = info.context_len * self.codec.max_chars_per_token
        texts = text if isinstance(text, list) else [text]
        for i, t in enumerate(texts):
            if isinstance(t, str) and len(t) > cap:
                where = f"text[{i}]" if isinstance(text, list) else "text"
                raise ValueError(f"{where} has {len(t)} characters: more than the model's context length "
                                 f"({info.context_len} tokens) can hold (at most "
                                 f"{self.codec.max_chars_per_token} characters a token), so it is refused "
                                 "without tokenizing.")
