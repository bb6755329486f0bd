"""Sampling parameters of one request, with the validation messages of API.md."""

from __future__ import annotations

import json
import math
from typing import Any

import msgspec

GREEDY_TEMPERATURE = 1e-6
# The sampler edits fp32 logits (bias, then the repetition penalty divides, then the temperature divides):
# past these bounds a logit overflows to inf and softmax gives NaN, which used to kill the scheduler.
# With them: |bias| / MIN_REPETITION_PENALTY / GREEDY_TEMPERATURE = 1e32, inside fp32's 3.4e38.
MIN_REPETITION_PENALTY = 1e-6
MAX_LOGIT_BIAS = 1e20


class SamplingParams(msgspec.Struct, kw_only=True):
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    n: int = 1
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    logit_bias: dict[int, float] = {}
    sampling_seed: int | None = None
    # Constrained decoding (runtime/grammar.py): at most one of them.
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @classmethod
    def from_dict(cls, params: dict[str, Any] | None) -> "SamplingParams":
        """Build from a user dict; unknown keys and wrong types raise ValueError naming the field."""
        params = dict(params or {})
        known = set(cls.__struct_fields__)
        for key in params:
            if key not in known:
                raise ValueError(f"Unknown sampling parameter: sampling_params.{key}={params[key]!r}.")
        if isinstance(params.get("stop"), str):
            params["stop"] = [params["stop"]]
        if params.get("stop") is None:
            params.pop("stop", None)
        if params.get("stop_token_ids") is None:
            params.pop("stop_token_ids", None)
        if params.get("logit_bias") is None:
            params.pop("logit_bias", None)
        if isinstance(params.get("json_schema"), dict):  # a schema object is taken as its JSON text
            params["json_schema"] = json.dumps(params["json_schema"])
        if params.get("max_new_tokens") is None:
            params.pop("max_new_tokens", None)
        try:
            sp = msgspec.convert(params, cls, strict=False)
        except msgspec.ValidationError as e:
            raise ValueError(f"Invalid sampling_params: {e} (got {params!r}).") from None
        sp.validate()
        return sp

    def validate(self, vocab_size: int | None = None) -> None:
        t = self.temperature
        if not (math.isfinite(t) and t >= 0):
            raise ValueError(f"temperature must be a non-negative finite number, got {t}.")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not (0 <= self.min_p <= 1):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if not (self.top_k == -1 or self.top_k >= 1):
            raise ValueError(f"top_k must be -1 (disable) or at least 1, got {self.top_k}.")
        if not (-2 <= self.frequency_penalty <= 2):
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not (-2 <= self.presence_penalty <= 2):
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not (0 < self.repetition_penalty <= 2):
            raise ValueError(
                f"repetition_penalty must be in (0, 2] (1.0 = no penalty), got {self.repetition_penalty}."
            )
        if self.repetition_penalty < MIN_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be at least {MIN_REPETITION_PENALTY:g} (a smaller one "
                             f"overflows the logits), got {self.repetition_penalty}.")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be at least 0, got {self.max_new_tokens}.")
        if not (0 <= self.min_new_tokens <= self.max_new_tokens):
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}.")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        for s in self.stop:
            if not isinstance(s, str) or s == "":
                raise ValueError(f"stop must be non-empty strings, got {s!r}.")
        grammars = [name for name in ("regex", "json_schema", "ebnf") if getattr(self, name) is not None]
        if len(grammars) > 1:
            raise ValueError("Only one of sampling_params.regex, json_schema and ebnf may be set, got "
                             + ", ".join(f"sampling_params.{name}" for name in grammars) + ".")
        if grammars and self.min_new_tokens > 0:
            raise ValueError(f"min_new_tokens cannot be combined with sampling_params.{grammars[0]} (the grammar "
                             f"decides where the output ends), got min_new_tokens={self.min_new_tokens}.")
        for b in self.logit_bias.values():
            if not math.isfinite(b):
                raise ValueError(f"logit_bias values must be finite, got {b}.")
            if abs(b) > MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}] (a larger "
                                 f"one overflows the logits), got {b}.")
        if vocab_size is not None:
            # A stop token id outside the vocabulary is accepted and never matches (SGLang accepts it too,
            # and model-agnostic clients send one list to every model).
            for tid in self.logit_bias:
                if not 0 <= tid < vocab_size:
                    raise ValueError(f"logit_bias has token id {tid}, outside the vocabulary [0, {vocab_size}).")
