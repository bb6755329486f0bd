"""Helpers for tests and benchmarks: a tiny random model with a real tokenizer, and a server subprocess.
Both import it as `tests.helpers`, from the repository root (pytest's `pythonpath`; `python -m benchmarks.x`).

    path = make_tiny_model_dir(tmp_dir)                 # random Llama, vocab 49152, SmolLM2's tokenizer
    with ServerProcess(["--model-path", path]) as server:
        requests.post(server.url + "/generate", json={...})
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import requests

from rollout.client.local_server import LocalServer, free_port  # noqa: F401 (free_port: re-exported)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt")


def make_tiny_model_dir(path: str | os.PathLike, *, hidden_size: int = 32, num_layers: int = 2,
                        context_length: int = 4096, init_std: float = 0.15, seed: int = 0) -> str:
    """A seeded random Llama with SmolLM2's vocabulary (49152) and tokenizer files, saved to `path`.

    Weights are N(0, init_std) (norms 1 + N(0, init_std)) so logits are far from flat and greedy
    decoding does not hinge on rounding."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from runtime.default_model import default_model_path

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=49152, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=context_length, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * init_std
            param.copy_(1.0 + noise if name.endswith("norm.weight") else noise)
    model.save_pretrained(str(path), safe_serialization=True)
    source = Path(default_model_path())
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, path / name)
    return str(path)


class ServerProcess(LocalServer):
    """A LocalServer started from raw CLI flags, with request helpers that send the API key."""

    def __init__(self, server_args: list[str], port: int | None = None, log_path: str | None = None,
                 env: dict[str, str] | None = None, api_key: str | None = None):
        super().__init__(None, port=port, log_path=log_path, env=env, api_key=api_key, flags=server_args)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def wait_ready(self, timeout: float) -> None:
        self.wait_until_ready(timeout)

    def post(self, path: str, timeout: float = 120.0, **kwargs: Any) -> requests.Response:
        return requests.post(self.url + path, headers=self.headers, timeout=timeout, **kwargs)

    def get(self, path: str, timeout: float = 120.0, **kwargs: Any) -> requests.Response:
        return requests.get(self.url + path, headers=self.headers, timeout=timeout, **kwargs)
