"""Model families by the `architectures` name in a checkpoint's config.json."""

from __future__ import annotations

from typing import Callable

from torch import nn

MODEL_REGISTRY: dict[str, type[nn.Module]] = {}


def register_model(*architectures: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        for name in architectures:
            MODEL_REGISTRY[name] = cls
        return cls
    return wrap


def get_model_class(architectures: list[str]) -> type[nn.Module]:
    # Importing the family modules registers them.
    import runtime.models.llama  # noqa: F401
    import runtime.models.mistral  # noqa: F401
    import runtime.models.qwen2  # noqa: F401
    import runtime.models.qwen3  # noqa: F401
    for name in architectures:
        if name in MODEL_REGISTRY:
            return MODEL_REGISTRY[name]
    raise ValueError(f"Unsupported architectures {architectures}; supported: {sorted(MODEL_REGISTRY)}.")
