"""The tokens a constrained sampling step may pick: a grammar's allowed set for some rows of a batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AllowedTokens:
    """Rows `rows` of a batch may only take the tokens whose bits are set in `bitmask`, xgrammar's packed
    int32 [batch, ceil(V / 32)] layout (bit b of word w: token 32 * w + b); other rows are free."""

    rows: list[int]
    bitmask: torch.Tensor

    def apply(self, logits: torch.Tensor) -> None:
        """Disallowed tokens of the listed rows get -inf, in place, on the packed bits directly (xgrammar's
        kernel for the logits' device: no [rows, V] boolean mask is built); other rows are not touched."""
        from xgrammar import apply_token_bitmask_inplace  # only grammar.py builds these, so it is installed

        apply_token_bitmask_inplace(logits, self.bitmask.to(logits.device, non_blocking=True),
                                    vocab_size=logits.shape[1], indices=self.rows)
