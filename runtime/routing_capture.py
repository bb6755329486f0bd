"""The experts each MoE layer routed each token to in one forward step (for routing replay and statistics).

A `RoutingCapture` rides on one `ForwardBatch` (its `routing` field); every MoE layer of the model records
its top-k expert ids there as it runs, rows in the batch's flat token order. Nothing is copied to the host
during the forward pass: the caller reads the ids afterwards (`stacked`, `of_layer`). A batch without a
capture records nothing, so the common path costs nothing.
"""

from __future__ import annotations

import torch


class RoutingCapture:
    def __init__(self) -> None:
        self._ids: dict[int, torch.Tensor] = {}  # layer index -> [T, k] expert ids, in recording order

    def record(self, layer_id: int, topk_ids: torch.Tensor) -> None:
        if layer_id in self._ids:
            raise ValueError(f"Layer {layer_id} recorded its routing twice in one forward step.")
        self._ids[layer_id] = topk_ids.detach()

    @property
    def layer_ids(self) -> list[int]:
        """The MoE layers that recorded, in ascending order."""
        return sorted(self._ids)

    def of_layer(self, layer_id: int) -> torch.Tensor:
        """[T, k] expert ids of one layer."""
        return self._ids[layer_id]

    def stacked(self) -> torch.Tensor:
        """[T, num MoE layers, k] expert ids (int64), layers in ascending order; [0, 0, 0] when none ran."""
        if not self._ids:
            return torch.empty(0, 0, 0, dtype=torch.long)
        return torch.stack([self._ids[i] for i in self.layer_ids], dim=1)
