"""The expert ids each KV slot's token was routed to, kept beside the KV cache (one row per slot).

Routing is written when a step writes KV (the same slots), so whatever the cache does to a token's KV
(a prefix hit served from a slot another request filled, a chunked prefill, a copy when a cached prefix is
detached for new weights) its routing follows: a request's routed experts are read from its own slots when
it finishes, complete for every token whose KV it holds, however much of it the cache computed. A token's
routing depends only on the tokens before it, as its KV does, so a slot's row is right for every sequence
that shares it.
"""

from __future__ import annotations

import torch

from runtime.models.moe_layout import MoeLayout
from runtime.routing_capture import RoutingCapture


class RoutedExpertsPool:
    def __init__(self, num_slots: int, layout: MoeLayout, device: torch.device | str):
        self.layout = layout
        # Row num_slots is the padding slot, as in the KV pool.
        self.ids = torch.zeros(num_slots + 1, layout.num_layers, layout.top_k, dtype=torch.int16, device=device)

    def nbytes(self) -> int:
        return self.ids.numel() * self.ids.element_size()

    @torch.no_grad()
    def write(self, slots: torch.Tensor, capture: RoutingCapture) -> None:
        """Store one step's routing ([T] slots, the capture's rows in the same order)."""
        if capture.layer_ids != list(self.layout.layer_ids):
            raise ValueError(f"The step recorded routing of layers {capture.layer_ids}; the model routes in "
                             f"{list(self.layout.layer_ids)}.")
        self.ids[slots] = capture.stacked().to(torch.int16)

    def read(self, slots: torch.Tensor) -> torch.Tensor:
        """[len(slots), MoE layers, top_k] int16 expert ids."""
        return self.ids[slots.to(self.ids.device)]

    @torch.no_grad()
    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.ids[dst] = self.ids[src]
