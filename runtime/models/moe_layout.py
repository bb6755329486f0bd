"""Which layers of a checkpoint route tokens to experts, among how many, choosing how many: read from its
config alone, so the HTTP front end (which loads no model) checks MoE-only fields as the engine would."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig

from runtime.models.registry import get_model_class


@dataclass(frozen=True)
class MoeLayout:
    layer_ids: tuple[int, ...]   # the model layers whose MLP is a sparse MoE block, ascending
    num_experts: int
    top_k: int

    @property
    def num_layers(self) -> int:
        return len(self.layer_ids)


def moe_layout(config: PretrainedConfig, is_embedding: bool = False) -> MoeLayout | None:
    """The config's MoE layout; None for a dense model (or one served for scoring)."""
    if is_embedding:
        return None
    try:
        cls = get_model_class(list(getattr(config, "architectures", None) or []), False)
    except ValueError:
        return None
    if not hasattr(cls, "moe_spec") or not hasattr(cls, "sparse_layers"):
        return None
    spec = cls.moe_spec(config)
    layers = tuple(cls.sparse_layers(config)) if spec.num_experts > 0 else ()
    if not layers:
        return None
    return MoeLayout(layer_ids=layers, num_experts=spec.num_experts, top_k=spec.top_k)
