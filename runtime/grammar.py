"""Constrained decoding: `sampling_params.regex`, `json_schema` or `ebnf` (SGLang's names), on xgrammar.

The front end checks a grammar's syntax (`check_grammar`, no tokenizer needed) so a bad one is a 400
naming the field. The scheduler compiles it against the tokenizer through a `GrammarCache` (compiled
grammars keyed by (kind, text), least recently used dropped first) and gives each constrained request
its own `RequestGrammar`: the set of tokens the grammar allows next (applied to the logits before
sampling, constrained rows only) and the matcher advanced with every sampled token. The matcher lives on
the request, so a retraction (which keeps the output tokens) keeps its state too.

xgrammar is an optional dependency (`pip install rl-rollout[grammar]`); without it a constrained request
is a 400 that says so, and unconstrained serving never imports it.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Sequence

import torch

from runtime.sampling_params import SamplingParams
from runtime.token_support import AllowedTokens

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

GRAMMAR_FIELDS = ("regex", "json_schema", "ebnf")
INSTALL_HINT = "Constrained decoding (regex, json_schema, ebnf) needs xgrammar: pip install 'rl-rollout[grammar]'."
# Compiled grammars kept per scheduler; a JSON schema's compiled form is usually a few hundred kB.
GRAMMAR_CACHE_SIZE = 256
# JSON may hold any whitespace between its tokens, as in SGLang, but at most this many characters in a
# row (ours): enough for deeply indented pretty-printing, and a policy cannot pad an answer forever.
JSON_MAX_WHITESPACE = 32
# xgrammar prefixes its messages with a timestamp and a C++ source location; the client needs neither.
_CPP_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+\.(cc|h):\d+:\s*")


def grammar_spec(sp: SamplingParams) -> tuple[str, str] | None:
    """(kind, text) of the request's grammar, or None; more than one kind is a ValueError naming them."""
    given = [(name, getattr(sp, name)) for name in GRAMMAR_FIELDS if getattr(sp, name) is not None]
    if len(given) > 1:
        names = ", ".join(f"sampling_params.{name}" for name, _ in given)
        raise ValueError(f"Only one of sampling_params.regex, json_schema and ebnf may be set, got {names}.")
    return given[0] if given else None


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    return xgrammar


def _clean(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return _CPP_PREFIX.sub("", text)


def _short(text: str, limit: int = 80) -> str:
    return repr(text) if len(text) <= limit else repr(text[: limit - 3]) + "..."


def check_grammar(sp: SamplingParams) -> None:
    """Parse the request's grammar (no tokenizer needed): a ValueError naming the field when it is bad."""
    spec = grammar_spec(sp)
    if spec is None:
        return
    kind, text = spec
    xgr = _xgrammar()
    parse = {"regex": xgr.Grammar.from_regex, "json_schema": xgr.Grammar.from_json_schema,
             "ebnf": xgr.Grammar.from_ebnf}[kind]
    try:
        parse(text)
    except Exception as e:  # xgrammar raises RuntimeError (and pydantic / JSON errors for schemas)
        raise ValueError(f"Invalid sampling_params.{kind}={_short(text)}: {_clean(e)}") from None


class RequestGrammar:
    """One request's position in its grammar: which tokens may come next, and the tokens accepted so far."""

    def __init__(self, matcher: Any):
        self._matcher = matcher

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        return bool(self._matcher.accept_token(token))

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token accepted (or it can take nothing more)."""
        return bool(self._matcher.is_terminated())


class GrammarCache:
    """Compiles grammars against one tokenizer and keeps the last `capacity` compiled ones."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: set[int],
                 capacity: int = GRAMMAR_CACHE_SIZE):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.capacity = capacity
        self._compiled: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._compiler: Any = None  # built on first use: the tokenizer scan takes about a second
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._compiled)

    def _get_compiler(self) -> Any:
        if self._compiler is None:
            xgr = _xgrammar()
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=self.eos_token_ids)
            # One thread: the scheduler shares the CPU with the model; our own LRU replaces xgrammar's cache.
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler

    def compiled(self, kind: str, text: str) -> Any:
        key = (kind, text)
        hit = self._compiled.get(key)
        if hit is not None:
            self._compiled.move_to_end(key)
            self.hits += 1
            return hit
        self.misses += 1
        compiler = self._get_compiler()
        compile_fn = {"regex": compiler.compile_regex, "ebnf": compiler.compile_grammar,
                      "json_schema": lambda schema: compiler.compile_json_schema(
                          schema, any_whitespace=True, max_whitespace_cnt=JSON_MAX_WHITESPACE)}[kind]
        try:
            grammar = compile_fn(text)
        except Exception as e:
            raise ValueError(f"Invalid sampling_params.{kind}={_short(text)}: {_clean(e)}") from None
        self._compiled[key] = grammar
        if len(self._compiled) > self.capacity:
            self._compiled.popitem(last=False)
        return grammar

    def matcher(self, kind: str, text: str) -> RequestGrammar:
        return RequestGrammar(_xgrammar().GrammarMatcher(self.compiled(kind, text)))


def allowed_tokens(grammars: Sequence[RequestGrammar | None], vocab_size: int) -> AllowedTokens | None:
    """The next-token sets of the constrained rows of a batch (None when no row is constrained)."""
    rows = [i for i, g in enumerate(grammars) if g is not None]
    if not rows:
        return None
    bitmask = torch.zeros(len(grammars), (vocab_size + 31) // 32, dtype=torch.int32)
    for i in rows:
        grammars[i].fill_bitmask(bitmask, i)
    return AllowedTokens(rows=rows, bitmask=bitmask)

