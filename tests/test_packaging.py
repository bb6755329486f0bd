"""Our top-level `kernels` package must not be mistaken for the Hugging Face hub library of that name.

transformers probes `kernels` by name and, when it looks like the hub library (version 0.18.x), routes
attention and layers through it; with our package in its place that would fail at model load.
"""

from __future__ import annotations

import importlib.metadata
import pathlib

import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_import_kernels_is_ours() -> None:
    import kernels

    assert kernels.__file__ is not None
    assert pathlib.Path(kernels.__file__).resolve().parent == REPO_ROOT / "kernels"
    # The hub library's entry points; transformers calls them once it believes the library is there.
    for name in ("get_kernel", "kernelize", "use_kernel_forward_from_hub"):
        assert not hasattr(kernels, name), name


def test_kernels_distribution_version_is_outside_hub_range() -> None:
    # transformers resolves the version of `kernels` through the distribution that ships it (ours);
    # keeping that version below the hub library's range is what keeps the probe off.
    from packaging.version import Version
    from transformers.utils.import_utils import KERNELS_MAX_VERSION, KERNELS_MIN_VERSION

    owners = importlib.metadata.packages_distributions().get("kernels", [])
    assert "rl-rollout" in owners
    ours = Version(importlib.metadata.version("rl-rollout"))
    assert not Version(KERNELS_MIN_VERSION) <= ours < Version(KERNELS_MAX_VERSION)


def test_transformers_sees_no_hub_kernels() -> None:
    from transformers.utils import is_kernels_available

    assert is_kernels_available() is False


def test_tiny_model_round_trips(tmp_path: pathlib.Path) -> None:
    # The Auto* path is what the weight loader and parity tests use, and it runs the availability probes.
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(tmp_path)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert loaded.config._attn_implementation in {"sdpa", "eager"}

    input_ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        expected = model(input_ids).logits
        actual = loaded(input_ids).logits
    assert actual.shape == (1, 5, config.vocab_size)
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
