"""Turns the fields of /encode, /classify, /v1/score and /v1/rerank (or Engine.encode / score / rerank)
into scheduler messages; shared by the in-process Engine and the HTTP front end, so both validate the
same way and raise ValueError naming the field and the value.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from runtime.messages import EmbedRequest, GenerateRequest
from runtime.sampling_params import SamplingParams
from runtime.scoring_output import ScoringCollector


@dataclass
class ModelLimits:
    vocab_size: int
    context_len: int           # inputs must be shorter than this
    token_types: bool          # a BERT-style encoder: send segment ids
    pad_token_id: int | None = None  # a reward head pools the last token that is not this one


@dataclass
class NormalizedScoring:
    is_batch: bool
    requests: list[GenerateRequest] | list[EmbedRequest]
    prompt_tokens: list[int] | None = None   # the client's counts, where requests run fewer tokens

    def collectors(self, start_time: float | None = None) -> list[ScoringCollector]:
        counts = self.prompt_tokens or [None] * len(self.requests)
        return [ScoringCollector(r, start_time, n) for r, n in zip(self.requests, counts)]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _check_ids(field: str, ids: list[int], limits: ModelLimits) -> None:
    if not ids:
        raise ValueError(f"{field} cannot be empty.")
    for t in ids:
        if not 0 <= t < limits.vocab_size:
            raise ValueError(f"{field} contains token id {t}, outside the vocabulary [0, {limits.vocab_size}).")
    if len(ids) >= limits.context_len:
        raise ValueError(f"{field} is {len(ids)} tokens, longer than the model's context length "
                         f"({limits.context_len - 1} tokens at most).")


def _need_tokenizer(tokenizer: PreTrainedTokenizerBase | None, field: str) -> PreTrainedTokenizerBase:
    if tokenizer is None:
        raise ValueError(f"{field} is text but the server runs with --skip-tokenizer-init; send token ids.")
    return tokenizer


def _rids(rid: Any, count: int, is_batch: bool) -> list[str]:
    if rid is None:
        base = uuid.uuid4().hex
        return [f"{base}_{i}" for i in range(count)] if is_batch else [base]
    if isinstance(rid, str):
        return [f"{rid}_{i}" for i in range(count)] if is_batch else [rid]
    if isinstance(rid, list) and all(isinstance(r, str) for r in rid) and len(rid) == count:
        if len(set(rid)) != len(rid):
            raise ValueError(f"rid has duplicates: {_short(rid)}.")
        return list(rid)
    raise ValueError(f"rid must be a string or a list of {count} strings, got {_short(rid)}.")


# --- /encode and /classify ------------------------------------------------------------------------


def normalize_embed(text: Any, input_ids: Any, rid: Any, tokenizer: PreTrainedTokenizerBase | None,
                    limits: ModelLimits) -> NormalizedScoring:
    """One EmbedRequest per text (or token-id list); text is tokenized with the default special tokens."""
    if (text is None) == (input_ids is None):
        raise ValueError("Either text or input_ids should be provided (exactly one).")
    prompts: list[list[int]] = []
    types: list[list[int] | None] = []
    if text is not None:
        is_batch = isinstance(text, list)
        texts = text if is_batch else [text]
        if is_batch and not texts:
            raise ValueError("text cannot be an empty list.")
        for t in texts:
            if not isinstance(t, str):
                raise ValueError(f"text must be a string or a list of strings, got {_short(t)}.")
            if not t:
                raise ValueError("text cannot contain an empty string.")
        enc = _need_tokenizer(tokenizer, "text")(texts)
        prompts = [list(ids) for ids in enc["input_ids"]]
        types = [list(t) for t in enc["token_type_ids"]] if limits.token_types and "token_type_ids" in enc \
            else [None] * len(prompts)
    else:
        if not isinstance(input_ids, list) or not input_ids:
            raise ValueError(f"input_ids must be a non-empty list of token ids or of such lists, got "
                             f"{_short(input_ids)}.")
        is_batch = isinstance(input_ids[0], list)
        prompts = input_ids if is_batch else [input_ids]
        for p in prompts:
            if not _is_ids(p):
                raise ValueError(f"input_ids must be a list of token ids or a list of such lists, got {_short(p)}.")
        types = [None] * len(prompts)
    for p in prompts:
        _check_ids("input_ids" if input_ids is not None else "text (tokenized)", p, limits)
    counts = [len(p) for p in prompts]
    if limits.pad_token_id is not None:  # see runtime/models/sequence_classification.py
        prompts = [_strip_trailing(p, limits.pad_token_id) for p in prompts]
    rids = _rids(rid, len(prompts), is_batch)
    reqs = [EmbedRequest(rid=r, input_ids=p, token_type_ids=t) for r, p, t in zip(rids, prompts, types)]
    return NormalizedScoring(is_batch=is_batch, requests=reqs, prompt_tokens=counts)


def _strip_trailing(ids: list[int], pad: int) -> list[int]:
    """Without trailing `pad` tokens (all pads: the first token, where transformers pools then)."""
    end = len(ids)
    while end > 1 and ids[end - 1] == pad:
        end -= 1
    return ids[:end]


# --- /v1/score --------------------------------------------------------------------------------------


def normalize_score(query: Any, items: Any, label_token_ids: Any, apply_softmax: Any, item_first: Any,
                    tokenizer: PreTrainedTokenizerBase | None, limits: ModelLimits) -> NormalizedScoring:
    """One single-step generation per item, asking for the label tokens' logprobs at the next position.

    Greedy, so the logprobs are of the untempered distribution (T = 1) and no random number is drawn;
    max_new_tokens = 1, so the step that prefills the sequence also finishes it (no decode)."""
    if not isinstance(apply_softmax, bool):
        raise ValueError(f"apply_softmax must be a boolean, got {_short(apply_softmax)}.")
    if not isinstance(item_first, bool):
        raise ValueError(f"item_first must be a boolean, got {_short(item_first)}.")
    if not _is_ids(label_token_ids) or not label_token_ids:
        raise ValueError(f"label_token_ids must be a non-empty list of token ids, got {_short(label_token_ids)}.")
    for t in label_token_ids:
        if not 0 <= t < limits.vocab_size:
            raise ValueError(f"label_token_ids contains token id {t}, outside the vocabulary "
                             f"[0, {limits.vocab_size}).")
    if isinstance(items, (str, list)) and not items:
        raise ValueError(f"items cannot be empty, got {_short(items)}.")
    if isinstance(query, str):
        item_list = [items] if isinstance(items, str) else items
        if not isinstance(item_list, list) or not all(isinstance(i, str) for i in item_list):
            raise ValueError(f"items must be a string or a list of strings when query is a string, got "
                             f"{_short(items)}.")
        if any(not i for i in item_list):
            raise ValueError("items cannot contain an empty string.")
        tok = _need_tokenizer(tokenizer, "query")
        texts = [i + query if item_first else query + i for i in item_list]
        seqs = [list(ids) for ids in tok(texts)["input_ids"]]
    elif _is_ids(query):
        if not query:
            raise ValueError("query cannot be empty.")
        if not isinstance(items, list) or not all(_is_ids(i) for i in items):
            raise ValueError(f"items must be a list of token-id lists when query is token ids, got {_short(items)}.")
        if any(not i for i in items):
            raise ValueError("items cannot contain an empty token-id list.")
        seqs = [i + query if item_first else query + i for i in items]
    else:
        raise ValueError(f"query must be a string or a list of token ids, got {_short(query)}.")
    for s in seqs:
        _check_ids("query + item", s, limits)
    sp = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
    base = uuid.uuid4().hex
    reqs = [GenerateRequest(rid=f"score-{base}_{i}", input_ids=s, sampling_params=sp, return_logprob=True,
                            token_ids_logprob=list(label_token_ids)) for i, s in enumerate(seqs)]
    return NormalizedScoring(is_batch=True, requests=reqs)


# --- /v1/rerank -------------------------------------------------------------------------------------


def normalize_rerank(query: Any, documents: Any, top_n: Any, return_documents: Any,
                     tokenizer: PreTrainedTokenizerBase | None, limits: ModelLimits) -> NormalizedScoring:
    """One EmbedRequest per (query, document) pair, encoded as a sentence pair by the model's tokenizer."""
    if not isinstance(query, str) or not query:
        raise ValueError(f"query must be a non-empty string, got {_short(query)}.")
    if not isinstance(documents, list) or not documents or not all(isinstance(d, str) for d in documents):
        raise ValueError(f"documents must be a non-empty list of strings, got {_short(documents)}.")
    if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 1):
        raise ValueError(f"top_n must be an integer >= 1, got {_short(top_n)}.")
    if not isinstance(return_documents, bool):
        raise ValueError(f"return_documents must be a boolean, got {_short(return_documents)}.")
    enc = _need_tokenizer(tokenizer, "query")([query] * len(documents), documents)
    types = enc["token_type_ids"] if limits.token_types and "token_type_ids" in enc else [None] * len(documents)
    base = uuid.uuid4().hex
    reqs = []
    for i, (ids, t) in enumerate(zip(enc["input_ids"], types)):
        _check_ids(f"query + documents[{i}]", list(ids), limits)
        reqs.append(EmbedRequest(rid=f"rerank-{base}_{i}", input_ids=list(ids),
                                 token_type_ids=None if t is None else list(t)))
    return NormalizedScoring(is_batch=True, requests=reqs)


def rerank_results(scores: list[float], documents: list[str], top_n: int | None,
                   return_documents: bool) -> list[dict]:
    """Sorted by score, highest first (ties keep document order), cut to top_n."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    if top_n is not None:
        order = order[:top_n]
    out = []
    for i in order:
        entry: dict[str, Any] = {"score": scores[i], "index": i}
        if return_documents:
            entry["document"] = documents[i]
        out.append(entry)
    return out


def model_limits(hf_config: Any, is_embedding: bool, vocab_size: int, context_len: int) -> ModelLimits:
    from runtime.models.registry import get_model_class
    cls = get_model_class(list(getattr(hf_config, "architectures", None) or []), is_embedding)
    token_types = bool(getattr(cls, "bidirectional", False)) and getattr(hf_config, "type_vocab_size", 1) > 1
    pad = getattr(hf_config, "pad_token_id", None) if getattr(cls, "pools_last_non_pad", False) else None
    return ModelLimits(vocab_size=vocab_size, context_len=context_len, token_types=token_types,
                       pad_token_id=pad)


def is_cross_encoder(hf_config: Any, is_embedding: bool) -> bool:
    from runtime.models.registry import get_model_class
    if not is_embedding:
        return False
    return bool(getattr(get_model_class(list(getattr(hf_config, "architectures", None) or []), True),
                        "is_cross_encoder", False))


# The 400 messages for a route on the wrong kind of server.
NEEDS_EMBEDDING = ("{route} needs a scoring model: this server runs a generation model; launch it with "
                   "--is-embedding (Engine(is_embedding=True)).")
NEEDS_GENERATION = ("{route} needs a generation model: this server runs with --is-embedding "
                    "(scoring models answer /encode, /classify and /v1/rerank).")
NEEDS_CROSS_ENCODER = ("{route} needs a cross-encoder (BertForSequenceClassification, "
                       "XLMRobertaForSequenceClassification) served with --is-embedding; this server runs {archs}.")
