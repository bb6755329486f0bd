"""OpenAI's response and stream-chunk shapes, rendered from the same ResponseBuilders /generate uses.

One `OpenAIRender` per call: whole responses (`response`) and, for a stream, the chunks of one choice
since its last chunk (`delta_chunk`), which hold back text that may still change (an unfinished UTF-8
character, the start of a stop string) so the concatenated deltas equal the final text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from runtime.response import ResponseBuilder

REPLACEMENT_CHAR = "\ufffd"


@dataclass
class _Sent:
    text: int = 0        # characters of the choice's text already sent
    tokens: int = 0      # output tokens already sent (logprobs, token ids)
    started: bool = False
    finished: bool = False


@dataclass
class OpenAIRender:
    tokenizer: PreTrainedTokenizerBase
    chat: bool                                  # chat.completion, else text_completion
    response_id: str
    model: str
    n: int                                      # samples per prompt (builders are prompt-major)
    top_logprobs: int | None                    # None: no logprobs
    return_token_ids: bool = False              # vLLM's prompt_token_ids / token_ids
    sglext_input_ids: bool = False              # SGLang's sglext.input_ids / output_ids
    sglext_output_ids: bool = False
    echo_texts: list[str] | None = None         # completions with echo: each prompt's text
    created: int = field(default_factory=lambda: int(time.time()))
    _sent: dict[int, _Sent] = field(default_factory=dict)

    # --- pieces -----------------------------------------------------------------------------------

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    @staticmethod
    def finish_reason(b: ResponseBuilder) -> tuple[str | None, Any]:
        fr = b.finish_reason
        if not b.finished or fr is None:
            return None, None
        return fr.get("type"), fr.get("matched")

    def _chat_logprobs(self, b: ResponseBuilder, start: int, end: int) -> dict[str, Any]:
        content = []
        for i in range(start, end):
            token = self._token(b.output_ids[i])
            top = []
            if self.top_logprobs:
                for lp, tid in b.output_top_logprobs[i][: self.top_logprobs]:
                    t = self._token(tid)
                    top.append({"token": t, "logprob": lp, "bytes": list(t.encode())})
            content.append({"token": token, "logprob": b.output_token_logprobs[i], "bytes": list(token.encode()),
                            "top_logprobs": top})
        return {"content": content}

    def _completion_logprobs(self, b: ResponseBuilder, start: int, end: int, offset: int) -> dict[str, Any]:
        tokens, offsets = [], []
        for i in range(start, end):
            tokens.append(self._token(b.output_ids[i]))
            offsets.append(offset)
            offset += len(tokens[-1])
        top = None
        if self.top_logprobs:
            top = [{self._token(tid): lp for lp, tid in b.output_top_logprobs[i][: self.top_logprobs]}
                   for i in range(start, end)]
        return {"tokens": tokens, "token_logprobs": b.output_token_logprobs[start:end], "top_logprobs": top,
                "text_offset": offsets}

    def _logprobs(self, b: ResponseBuilder, start: int, end: int, text_offset: int) -> dict[str, Any] | None:
        if self.top_logprobs is None:
            return None
        if self.chat:
            return self._chat_logprobs(b, start, end)
        return self._completion_logprobs(b, start, end, text_offset)

    def _prompt_ids(self, builders: list[ResponseBuilder]) -> list[list[int]]:
        return [list(b.req.input_ids) for b in builders[:: self.n]]

    def usage(self, builders: list[ResponseBuilder]) -> dict[str, Any]:
        prompt = sum(b.prompt_tokens for b in builders[:: self.n])  # a prompt counts once, whatever n
        completion = sum(len(b.output_ids) for b in builders)
        cached = sum(b.cached_tokens for b in builders[:: self.n])
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def _sglext(self, builders: list[ResponseBuilder]) -> dict[str, Any] | None:
        ext: dict[str, Any] = {}
        if self.sglext_input_ids:
            ids = self._prompt_ids(builders)
            ext["input_ids"] = ids[0] if len(ids) == 1 else ids
        if self.sglext_output_ids:
            ext["output_ids"] = [list(b.output_ids) for b in builders]
        return ext or None

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.response_id, "object": kind, "created": self.created, "model": self.model}

    # --- whole responses --------------------------------------------------------------------------

    def response(self, builders: list[ResponseBuilder]) -> dict[str, Any]:
        choices = []
        for i, b in enumerate(builders):
            text = b.text()
            if self.echo_texts is not None:
                text = self.echo_texts[i // self.n] + text
            reason, matched = self.finish_reason(b)
            choice: dict[str, Any] = {"index": i, "logprobs": self._logprobs(b, 0, len(b.output_ids), 0),
                                      "finish_reason": reason, "matched_stop": matched}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text, "tool_calls": None}
            else:
                choice["text"] = text
            if self.return_token_ids:
                choice["token_ids"] = list(b.output_ids)
                if not self.chat:
                    choice["prompt_token_ids"] = list(b.req.input_ids)
            choices.append(choice)
        out = self._envelope(chunk=False)
        out.update({"choices": choices, "usage": self.usage(builders),
                    "metadata": {"weight_version": builders[0].weight_version}})
        if self.chat and self.return_token_ids:
            out["prompt_token_ids"] = list(builders[0].req.input_ids)
        ext = self._sglext(builders)
        if ext is not None:
            out["sglext"] = ext
        return out

    # --- stream chunks ----------------------------------------------------------------------------

    def _safe_end(self, b: ResponseBuilder, text: str) -> int:
        """How much of an unfinished choice's text cannot change any more."""
        end = len(text)
        while end > 0 and text[end - 1] == REPLACEMENT_CHAR:  # a character whose bytes are still coming
            end -= 1
        for stop in b.req.sampling_params.stop:  # a stop string that may be completing: the text is cut there
            for k in range(min(len(stop) - 1, end), 0, -1):
                if text[:end].endswith(stop[:k]):
                    end -= k
                    break
        return end

    def delta_chunk(self, index: int, b: ResponseBuilder) -> dict[str, Any] | None:
        """The chunk for choice `index` with what changed since its last one (None if nothing did)."""
        sent = self._sent.setdefault(index, _Sent())
        if sent.finished:
            return None
        text = b.text()
        end = len(text) if b.finished else max(self._safe_end(b, text), sent.text)
        piece = text[sent.text:end]
        if not sent.started and self.echo_texts is not None:
            piece = self.echo_texts[index // self.n] + piece
        tokens_end = len(b.output_ids)
        reason, matched = self.finish_reason(b)
        if not piece and tokens_end == sent.tokens and reason is None and sent.started:
            return None
        choice: dict[str, Any] = {"index": index,
                                  "logprobs": self._logprobs(b, sent.tokens, tokens_end, sent.text),
                                  "finish_reason": reason, "matched_stop": matched}
        if self.chat:
            choice["delta"] = {"content": piece} if sent.started else {"role": "assistant", "content": piece}
        else:
            choice["text"] = piece
        if self.return_token_ids:
            choice["token_ids"] = list(b.output_ids[sent.tokens:tokens_end])
            if not self.chat and not sent.started:
                choice["prompt_token_ids"] = list(b.req.input_ids)
        chunk = self._envelope(chunk=True)
        chunk["choices"] = [choice]
        if self.chat and self.return_token_ids and not sent.started:
            chunk["prompt_token_ids"] = list(b.req.input_ids)
        if reason is not None:  # the version that produced the choice's last token
            chunk["metadata"] = {"weight_version": b.weight_version}
        sent.text, sent.tokens, sent.started = end, tokens_end, True
        sent.finished = reason is not None
        return chunk

    def final_chunk(self, builders: list[ResponseBuilder], include_usage: bool) -> dict[str, Any] | None:
        """After every choice finished, one chunk without choices for usage and SGLang's sglext, only when
        asked (client code often reads `chunk.choices[0]` of every chunk)."""
        ext = self._sglext(builders)
        if not include_usage and ext is None:
            return None
        chunk = self._envelope(chunk=True)
        chunk["choices"] = []
        if include_usage:
            chunk["usage"] = self.usage(builders)
        if ext is not None:
            chunk["sglext"] = ext
        return chunk
