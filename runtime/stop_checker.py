"""Finds stop strings in the text of a request's newest tokens."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class StopChecker:
    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer

    def find(self, output_ids: list[int], stops: list[str]) -> str | None:
        """The first stop string that the output's tail contains, or None.

        Only the tail is decoded: a token carries at least one character or is a piece of one, so
        the longest stop string plus a margin of tokens covers any new match.
        """
        window = max(len(s) for s in stops) + 8
        text = self.tokenizer.decode(output_ids[-window:], skip_special_tokens=False)
        for stop in stops:
            if stop in text:
                return stop
        return None
