"""Model families by the `architectures` name in a checkpoint's config.json.

Two tables: generation models (`register_model`) and the models an `--is-embedding` server runs
(`register_scoring_model`: reward heads, embedding poolers, encoders). A decoder family's CausalLM name
appears in both: generating in one mode, pooling its last hidden state in the other (as gte-Qwen2 does).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

MODEL_REGISTRY: dict[str, type[nn.Module]] = {}
SCORING_MODEL_REGISTRY: dict[str, type[nn.Module]] = {}


def register_model(*architectures: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        for name in architectures:
            MODEL_REGISTRY[name] = cls
        return cls
    return wrap


def register_scoring_model(*architectures: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        for name in architectures:
            SCORING_MODEL_REGISTRY[name] = cls
        return cls
    return wrap


def _import_families() -> None:
    # Importing the family modules registers them.
    import runtime.models.bert  # noqa: F401
    import runtime.models.decoder_embedding  # noqa: F401
    import runtime.models.llama  # noqa: F401
    import runtime.models.mistral  # noqa: F401
    import runtime.models.mixtral  # noqa: F401
    import runtime.models.qwen2  # noqa: F401
    import runtime.models.qwen2_moe  # noqa: F401
    import runtime.models.qwen3  # noqa: F401
    import runtime.models.qwen3_moe  # noqa: F401
    import runtime.models.sequence_classification  # noqa: F401


def get_model_class(architectures: list[str], is_embedding: bool = False) -> type[nn.Module]:
    _import_families()
    table = SCORING_MODEL_REGISTRY if is_embedding else MODEL_REGISTRY
    for name in architectures:
        if name in table:
            return table[name]
    if not is_embedding and any(name in SCORING_MODEL_REGISTRY for name in architectures):
        raise ValueError(f"{architectures} is a scoring model (reward, embedding or encoder): serve it with "
                         "--is-embedding (Engine(is_embedding=True)).")
    mode = "scoring (--is-embedding)" if is_embedding else "generation"
    raise ValueError(f"Unsupported architectures {architectures} for {mode}; supported: {sorted(table)}.")
