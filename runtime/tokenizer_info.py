"""Facts about a model's tokenizer that the runtime needs: which ids end a generation."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PretrainedConfig, PreTrainedTokenizerBase


def eos_token_ids(model_path: str, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase | None) -> set[int]:
    """EOS ids from config.json, generation_config.json and the tokenizer, as transformers' generate uses."""
    ids: set[int] = set()

    def add(value: int | list[int] | None) -> None:
        if value is None:
            return
        ids.update([value] if isinstance(value, int) else value)

    add(getattr(config, "eos_token_id", None))
    gen_config = Path(model_path) / "generation_config.json"
    if gen_config.exists():
        add(json.loads(gen_config.read_text()).get("eos_token_id"))
    if tokenizer is not None:
        add(tokenizer.eos_token_id)
    return ids
