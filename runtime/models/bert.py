"""BERT-style bidirectional encoders: BertModel (mean pooling, L2-normalised: sentence embeddings such as
all-MiniLM-L6-v2), and the cross-encoders BertForSequenceClassification and
XLMRobertaForSequenceClassification (the head on the first token: reranker scores).

Absolute position embeddings, token types, post-LayerNorm residual blocks, GELU; parameter names are
transformers' own, so HF names map one to one (`weight_target`), for load and for hot weight updates.
Sequences are packed (no padding in the linear layers); attention runs per sequence, non-causal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from runtime.attention.bidirectional import PackedLayout, bidirectional_attention
from runtime.models.activations import activation
from runtime.weight_loader import copy_into_target


@dataclass
class EncoderBatch:
    input_ids: torch.Tensor       # [T] tokens of every sequence, packed
    token_type_ids: torch.Tensor  # [T] segment of each token (0 = first text, 1 = second of a pair)
    positions: torch.Tensor       # [T] position within its sequence, from 0
    layout: PackedLayout


class BertEmbeddings(nn.Module):
    def __init__(self, config: PretrainedConfig, position_offset: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # RoBERTa numbers positions from padding_idx + 1 (its pad token's position is padding_idx).
        self.position_offset = position_offset

    def forward(self, batch: EncoderBatch) -> torch.Tensor:
        h = (self.word_embeddings(batch.input_ids) + self.token_type_embeddings(batch.token_type_ids)
             + self.position_embeddings(batch.positions + self.position_offset))
        return self.LayerNorm(h)


class BertSelfAttention(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, h: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        t = h.shape[0]
        q, k, v = (proj(h).view(t, self.num_heads, self.head_dim) for proj in (self.query, self.key, self.value))
        return bidirectional_attention(q, k, v, layout, self.head_dim ** -0.5).reshape(t, -1)


class BertResidualOutput(nn.Module):
    """dense, then LayerNorm over the residual sum (post-LN): transformers' BertSelfOutput / BertOutput."""

    def __init__(self, in_features: int, config: PretrainedConfig):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertResidualOutput(config.hidden_size, config)

    def forward(self, h: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        return self.output(self.self(h, layout), h)


class BertIntermediate(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(h))


class BertLayer(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertResidualOutput(config.intermediate_size, config)

    def forward(self, h: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        h = self.attention(h, layout)
        return self.output(self.intermediate(h), h)


class BertEncoder(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, h: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        for layer in self.layer:
            h = layer(h, layout)
        return h


class BertPooler(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, first_tokens: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(first_tokens))


class BertBackbone(nn.Module):
    """transformers' BertModel / XLMRobertaModel: embeddings, encoder, optional pooler."""

    def __init__(self, config: PretrainedConfig, position_offset: int = 0, pooler: bool = True):
        super().__init__()
        self.embeddings = BertEmbeddings(config, position_offset)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if pooler else None

    def forward(self, batch: EncoderBatch) -> torch.Tensor:
        return self.encoder(self.embeddings(batch), batch.layout)


class EncoderModel(nn.Module):
    """What the encoder runner needs of a model: `max_positions`, `forward(batch) -> [B, out]`, and the
    HF-named weight interface of the decoder families (load, hot updates)."""

    bidirectional = True
    is_cross_encoder = False
    # Checkpoint entries with no parameter here that are safe to ignore (buffers, an unused pooler).
    skipped_prefixes: tuple[str, ...] = ()

    def finish_init(self) -> None:
        self._params = dict(self.named_parameters())

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings

    def weight_target(self, hf_name: str) -> torch.Tensor | None:
        if hf_name.endswith("position_ids") or hf_name.startswith(self.skipped_prefixes):
            return None
        if hf_name not in self._params:
            raise KeyError(hf_name)
        return self._params[hf_name].data

    def load_weight(self, hf_name: str, tensor: torch.Tensor) -> None:
        copy_into_target(self.weight_target(hf_name), hf_name, tensor)

    def hf_weight_names(self) -> list[str]:
        return list(self._params)


class BertEmbeddingModel(EncoderModel):
    skipped_prefixes = ("pooler.",)   # sentence embeddings mean-pool the tokens; the pooler is unused

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config, 0)
        self.encoder = BertEncoder(config)
        self.finish_init()

    def forward(self, batch: EncoderBatch) -> torch.Tensor:
        h = self.encoder(self.embeddings(batch), batch.layout)
        return F.normalize(batch.layout.mean(h.float()), p=2.0, dim=-1)


class BertForSequenceClassification(EncoderModel):
    is_cross_encoder = True

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.config = config
        self.bert = BertBackbone(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.finish_init()

    def forward(self, batch: EncoderBatch) -> torch.Tensor:
        h = self.bert(batch)
        return self.classifier(self.bert.pooler(h[batch.layout.starts])).float()


class RobertaClassificationHead(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, first_tokens: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(first_tokens)))


class XLMRobertaForSequenceClassification(EncoderModel):
    is_cross_encoder = True
    skipped_prefixes = ("roberta.pooler.",)

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.config = config
        self.roberta = BertBackbone(config, position_offset=config.pad_token_id + 1, pooler=False)
        self.classifier = RobertaClassificationHead(config)
        self.finish_init()

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings - self.config.pad_token_id - 1

    def forward(self, batch: EncoderBatch) -> torch.Tensor:
        h = self.roberta(batch)
        return self.classifier(h[batch.layout.starts]).float()
