"""Model families by the `architectures` name in a checkpoint's config.json.

Two tables of "module:class", imported only when a checkpoint names them: generation models, and the
models an `--is-embedding` server runs (reward heads, embedding poolers, encoders). A decoder family's
CausalLM name appears in both: generating in one mode, pooling its last hidden state in the other (as
gte-Qwen2 does). A new family is a module under runtime/models/ and one line per architecture here.
"""

from __future__ import annotations

import pkgutil

from torch import nn

GENERATION_MODELS: dict[str, str] = {
    "LlamaForCausalLM": "runtime.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "runtime.models.mistral:MistralForCausalLM",
    "Qwen2ForCausalLM": "runtime.models.qwen2:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "runtime.models.qwen3:Qwen3ForCausalLM",
    "Qwen2MoeForCausalLM": "runtime.models.qwen2_moe:Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM": "runtime.models.qwen3_moe:Qwen3MoeForCausalLM",
    "MixtralForCausalLM": "runtime.models.mixtral:MixtralForCausalLM",
}

SCORING_MODELS: dict[str, str] = {
    "LlamaForCausalLM": "runtime.models.decoder_embedding:LlamaEmbeddingModel",
    "LlamaModel": "runtime.models.decoder_embedding:LlamaEmbeddingModel",
    "Qwen2ForCausalLM": "runtime.models.decoder_embedding:Qwen2EmbeddingModel",
    "Qwen2Model": "runtime.models.decoder_embedding:Qwen2EmbeddingModel",
    "Qwen3ForCausalLM": "runtime.models.decoder_embedding:Qwen3EmbeddingModel",
    "Qwen3Model": "runtime.models.decoder_embedding:Qwen3EmbeddingModel",
    "MistralForCausalLM": "runtime.models.decoder_embedding:MistralEmbeddingModel",
    "MistralModel": "runtime.models.decoder_embedding:MistralEmbeddingModel",
    "LlamaForSequenceClassification": "runtime.models.sequence_classification:LlamaForSequenceClassification",
    "Qwen2ForSequenceClassification": "runtime.models.sequence_classification:Qwen2ForSequenceClassification",
    "BertModel": "runtime.models.bert:BertEmbeddingModel",
    "BertForSequenceClassification": "runtime.models.bert:BertForSequenceClassification",
    "XLMRobertaForSequenceClassification": "runtime.models.bert:XLMRobertaForSequenceClassification",
    "RobertaForSequenceClassification": "runtime.models.bert:XLMRobertaForSequenceClassification",
}


def get_model_class(architectures: list[str], is_embedding: bool = False) -> type[nn.Module]:
    table = SCORING_MODELS if is_embedding else GENERATION_MODELS
    for name in architectures:
        if name in table:
            return pkgutil.resolve_name(table[name])
    if not is_embedding and any(name in SCORING_MODELS for name in architectures):
        raise ValueError(f"{architectures} is a scoring model (reward, embedding or encoder): serve it with "
                         "--is-embedding (Engine(is_embedding=True)).")
    mode = "scoring (--is-embedding)" if is_embedding else "generation"
    raise ValueError(f"Unsupported architectures {architectures} for {mode}; supported: {sorted(table)}.")
