"""The support of the truncated distribution that kernels/sampling.py draws from: the token ids a
top-k / top-p / min-p cut keeps, by the same rule (`_draw_truncated`'s), for `return_sampling_mask`.

The rule: sort by probability, highest first, equal probabilities in id order (a stable sort); keep the
first n = min(top_k, the smallest count whose float64 running sum reaches top_p); then drop tokens under
min_p times the highest probability; a token of probability 0 is never drawn, so it is not in the
support either. Plain torch on any device: it runs only for rows that ask for their mask.
"""

from __future__ import annotations

import torch


def truncation_support(probs: torch.Tensor, top_k: int, top_p: float, min_p: float) -> list[int]:
    """Kept token ids of one row of probs [V] (fp32, softmaxed), most probable first."""
    vocab = probs.shape[0]
    vals, ids = torch.sort(probs, descending=True, stable=True)
    n = vocab if top_k <= 0 else min(top_k, vocab)
    if top_p < 1.0:
        cum = torch.cumsum(vals, dim=0, dtype=torch.float64)
        n = min(n, int(((cum - vals.double()) < top_p).sum()))
    vals, ids = vals[:n], ids[:n]
    keep = vals > 0
    if min_p > 0.0:
        keep &= vals >= torch.tensor(min_p, dtype=torch.float32, device=probs.device) * vals[0]
    return ids[keep].tolist()
