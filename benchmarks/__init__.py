"""Benchmarks, run from a checkout (not installed): each prints our figure beside its baseline from the
same run, and the ratio.

    python -m benchmarks.generation     # Engine vs transformers generate (GRPO-shaped, single stream)
    python -m benchmarks.serving        # HTTP server vs in-process Engine, per client concurrency
    python -m benchmarks.weight_update  # disk / broadcast updates vs the raw operations; control under load
    python -m benchmarks.scoring        # /classify vs transformers, length-sorted padded batches
    python -m benchmarks.arch_metrics   # the layout's figures: lines per folder, import cycles, private reach-ins

They build tiny test models with the helpers in tests/ (`tests.helpers`, `tests.scoring_models`), found
from the repository root.
"""
