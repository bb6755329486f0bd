"""`Engine.encode`, `Engine.score`, `Engine.rerank`: the Scoring routes of API.md in-process.

A mixin of runtime/engine.py's Engine (it uses the Engine's scheduler thread, tokenizer and request
plumbing); the answers are exactly the HTTP routes'."""

from __future__ import annotations

from typing import Any

from runtime.scoring_input import (NEEDS_CROSS_ENCODER, NEEDS_EMBEDDING, NEEDS_GENERATION, ModelLimits,
                                   NormalizedScoring, is_cross_encoder, model_limits, normalize_embed,
                                   normalize_rerank, normalize_score, rerank_results)
from runtime.scoring_output import ScoringCollector


class EngineScoring:
    def _scoring_limits(self) -> ModelLimits:
        return model_limits(self.runner.hf_config, self.args.is_embedding, self.runner.vocab_size,
                            self.runner.context_len)

    def _run_scoring(self, norm: NormalizedScoring) -> list[ScoringCollector]:
        collectors = norm.collectors()
        self._collect(norm, collectors)
        return collectors

    def encode(self, prompt: str | list[str] | None = None, input_ids: list[int] | list[list[int]] | None = None,
               rid: str | list[str] | None = None) -> dict | list[dict]:
        """/encode and /classify: {"embedding", "meta_info"} per input (a reward model's reward is
        embedding[0])."""
        if not self.args.is_embedding:
            raise ValueError(NEEDS_EMBEDDING.format(route="encode"))
        norm = normalize_embed(prompt, input_ids, rid, self.tokenizer, self._scoring_limits())
        results = [c.to_dict() for c in self._run_scoring(norm)]
        return results if norm.is_batch else results[0]

    def score(self, query: str | list[int], items: str | list[str] | list[list[int]], label_token_ids: list[int],
              apply_softmax: bool = False, item_first: bool = False) -> list[list[float]]:
        """/v1/score's `scores`: per item, the probability of each label token after query + item."""
        if self.args.is_embedding:
            raise ValueError(NEEDS_GENERATION.format(route="score"))
        norm = normalize_score(query, items, label_token_ids, apply_softmax, item_first, self.tokenizer,
                               self._scoring_limits())
        return [c.label_scores(label_token_ids, apply_softmax) for c in self._run_scoring(norm)]

    def rerank(self, query: str, documents: list[str], top_n: int | None = None,
               return_documents: bool = True) -> list[dict[str, Any]]:
        """/v1/rerank's answer: {"score", "document", "index"} sorted by score, highest first."""
        if not is_cross_encoder(self.runner.hf_config, self.args.is_embedding):
            archs = getattr(self.runner.hf_config, "architectures", None)
            raise ValueError(NEEDS_CROSS_ENCODER.format(route="rerank", archs=archs))
        norm = normalize_rerank(query, documents, top_n, return_documents, self.tokenizer, self._scoring_limits())
        scores = [c.to_dict()["embedding"][0] for c in self._run_scoring(norm)]
        return rerank_results(scores, documents, top_n, return_documents)
