"""`IncrementalStream`: turns a stream's cumulative chunks into deltas (`--incremental-streaming-output`,
SGLang's flag): each chunk's `output_ids`, `text` and per-output-token lists in `meta_info` hold only
what is new since the same sample's previous chunk. Everything else in the chunk (`meta_info` counts,
`finish_reason`, prompt-side logprobs) stays as the cumulative chunk has it.
"""

from __future__ import annotations

from typing import Any

# meta_info lists aligned with output_ids: sliced like them.
OUTPUT_ALIGNED = ("output_token_logprobs", "output_top_logprobs", "output_token_ids_logprobs",
                  "output_token_weight_versions")
# A decoded prefix of the output ending in this may still change (a character split across tokens):
# such text is held back until a later token completes it, or the request finishes.
INCOMPLETE_CHAR = "\ufffd"


class IncrementalStream:
    def __init__(self) -> None:
        self._ids_sent: dict[int, int] = {}
        self._text_sent: dict[int, str] = {}

    def delta(self, index: int, chunk: dict[str, Any], finished: bool) -> dict[str, Any]:
        start = self._ids_sent.get(index, 0)
        ids = chunk["output_ids"]
        chunk["output_ids"] = ids[start:]
        self._ids_sent[index] = len(ids)
        meta = chunk["meta_info"]
        for key in OUTPUT_ALIGNED:
            if key in meta:
                meta[key] = meta[key][start:]
        if "text" in chunk:
            chunk["text"] = self._text_delta(index, chunk["text"], finished)
        return chunk

    def _text_delta(self, index: int, text: str, finished: bool) -> str:
        sent = self._text_sent.get(index, "")
        if not finished and text.endswith(INCOMPLETE_CHAR):
            text = text.rstrip(INCOMPLETE_CHAR)
        if not text.startswith(sent):
            # The final text was cut at a stop string already partly sent: nothing more to add (the
            # concatenated deltas may then end with the start of the stop string, as with SGLang).
            return ""
        self._text_sent[index] = text
        return text[len(sent):]
