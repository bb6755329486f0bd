"""Which tokens a sampling step may pick: the grammar's allowed set going in, and the support actually
sampled from (after top-k / top-p / min-p truncation) coming out, for `return_sampling_mask`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.row_select import long_tensor


@dataclass
class AllowedTokens:
    """For the batch rows listed in `rows`, the tokens they may take next (bool [len(rows), V])."""

    rows: list[int]
    mask: torch.Tensor

    def apply(self, logits: torch.Tensor) -> None:
        """Disallowed tokens of the listed rows get -inf, in place; other rows are not touched."""
        idx = long_tensor(self.rows, logits.device)
        mask = self.mask.to(logits.device)
        logits[idx] = logits[idx].masked_fill(~mask[:, : logits.shape[1]], float("-inf"))
