"""What the linear layers alone cost: the bound a generation run is measured against.

A decoder step is its linear layers (q/k/v, o, gate/up, down in every layer, and the LM head for the rows
that sample) plus everything else (attention, norms, rotary, sampling, scheduling). Timing those same
matrix products by themselves, with the same torch, threads and dtype, on the shapes a run feeds them,
gives the time no implementation built on these products can beat:

- the matrix-vector bound (one token per step, single stream): every weight streamed once per token;
- the GEMM bound (a GRPO-shaped run): prefill of each prompt once, then one row per sample per step.

`LinearBound.seconds(rows)` times one pass over all weights at `rows` rows (cached per row count).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig


def linear_shapes(config: PretrainedConfig) -> list[tuple[int, int]]:
    """(out_features, in_features) of every product one token goes through, LM head included, with
    q/k/v and gate/up fused as the engine runs them."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inter = config.intermediate_size
    layer = [((heads + 2 * kv_heads) * head_dim, hidden), (hidden, heads * head_dim), (2 * inter, hidden),
             (hidden, inter)]
    return layer * config.num_hidden_layers + [(config.vocab_size, hidden)]


@dataclass
class LinearBound:
    config: PretrainedConfig
    dtype: torch.dtype = torch.float32
    repeats: int = 3
    _cache: dict[tuple[int, bool], float] = field(default_factory=dict)

    def seconds(self, rows: int, decoder: bool = True, head: bool = True) -> float:
        """Fastest of `repeats` passes of `rows` rows through the decoder's weights and/or the LM head
        (distinct weights, so a matrix-vector pass streams the whole model from memory as a real step does)."""
        total = 0.0
        if decoder:
            total += self._time(rows, head=False)
        if head:
            total += self._time(rows, head=True)
        return total

    def _time(self, rows: int, head: bool) -> float:
        if (rows, head) not in self._cache:
            shapes = linear_shapes(self.config)
            shapes = shapes[-1:] if head else shapes[:-1]
            weights = [torch.randn(o, i, dtype=self.dtype) * 0.02 for o, i in shapes]
            inputs = {i: torch.randn(rows, i, dtype=self.dtype) for _, i in shapes}
            best = float("inf")
            with torch.inference_mode():
                for _ in range(self.repeats + 1):  # the first pass warms up the allocator and caches
                    start = time.perf_counter()
                    for w in weights:
                        F.linear(inputs[w.shape[1]], w)
                    best = min(best, time.perf_counter() - start)
            self._cache[(rows, head)] = best
        return self._cache[(rows, head)]

    def single_stream_seconds(self, prompt_len: int, new_tokens: int) -> float:
        """Prefill of the prompt (only its last row through the LM head), then new_tokens - 1 one-row steps."""
        return self.seconds(prompt_len, head=False) + self.seconds(1, decoder=False) \
            + (new_tokens - 1) * self.seconds(1)

    def grpo_seconds(self, prompt_lens: list[int], n: int, new_tokens: int) -> float:
        """Each prompt prefilled once (its n samples share it; their first tokens come from its last row's
        logits), then new_tokens - 1 steps of one row per sample."""
        rows = len(prompt_lens) * n
        prefill = self.seconds(sum(prompt_lens), head=False) + self.seconds(len(prompt_lens), decoder=False)
        return prefill + (new_tokens - 1) * self.seconds(rows)
