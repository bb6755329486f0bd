"""The models of the device check (benchmarks/gpu_check.py), built from a config and a fixed seed.

No checkpoint travels to the GPU machine (no hub there): each model is a transformers model of a real
model's shape with seeded random weights, saved as safetensors for the Engine. Weights are N(0, 0.05)
(norm weights 1 + N(0, 0.1)) rather than transformers' init (std 0.02, unit norms), so logits spread
enough that a top-1 comparison in bf16 is not decided by near-ties everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# name: (config class, config). SmolLM2-135M (the default real model) and Qwen2.5-0.5B, from their
# config.json on the hub.
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "smollm2-135m": ("LlamaConfig", dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)),
    "qwen2.5-0.5b": ("Qwen2Config", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645, use_sliding_window=False)),
    # --tiny: the same families, small enough for a CPU run of the whole driver in a minute or two.
    "tiny-llama": ("LlamaConfig", dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2)),
    "tiny-qwen2": ("Qwen2Config", dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, use_sliding_window=False)),
}


def _set_rope_theta(config, theta: float) -> None:
    # transformers 5 keeps rope_theta inside rope_parameters; 4.x as an attribute. Either way the value
    # lands where the model reads it.
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict):
        params["rope_theta"] = theta
    else:
        config.rope_theta = theta


def build_model(shape: str, seed: int = 0, init_std: float = 0.05) -> torch.nn.Module:
    """The fp32 transformers model of `shape`, with seeded weights, on the CPU, in eval mode."""
    import transformers

    cls_name, fields = SHAPES[shape]
    fields = dict(fields)
    theta = fields.pop("rope_theta", None)
    config = getattr(transformers, cls_name)(**fields)
    if theta is not None:
        _set_rope_theta(config, theta)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():   # tied weights appear once
            noise = torch.randn(param.shape, generator=gen) * (0.1 if name.endswith("norm.weight") else init_std)
            param.copy_(1.0 + noise if name.endswith("norm.weight") else noise)
    return model.eval()


def save_model(shape: str, folder: Path, seed: int = 0) -> Path:
    """Build and save (config.json, model.safetensors); an existing save of the same shape and seed is reused."""
    path = folder / f"{shape}-seed{seed}"
    if not (path / "model.safetensors").exists() and not list(path.glob("model-*.safetensors")):
        build_model(shape, seed).save_pretrained(str(path), safe_serialization=True)
    return path


def prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Random prompts of length - 8 .. length + 8 tokens (ids above 200, clear of special tokens)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(max(1, length - 8), length + 9, (count,), generator=g)
    low = min(200, vocab // 4)
    return [torch.randint(low, vocab, (int(n),), generator=g).tolist() for n in lens]
