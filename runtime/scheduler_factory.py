"""Builds the scheduler a server or Engine runs: the paged, chunked Scheduler for decoder models
(generation, and the reward / embedding heads on a decoder), or the EncoderScheduler for bidirectional
encoders (which have no KV cache to page or chunk)."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from runtime.encoder_runner import EncoderRunner
from runtime.encoder_scheduler import EncoderScheduler
from runtime.grammar import GrammarCache
from runtime.model_runner import ModelRunner, load_hf_config
from runtime.models.registry import get_model_class
from runtime.scheduler import Scheduler
from runtime.server_args import ServerArgs
from runtime.stop_checker import StopChecker
from runtime.tokenizer_info import eos_token_ids


def build_scheduler(args: ServerArgs, tokenizer: PreTrainedTokenizerBase | None,
                    progress: bool = True) -> Scheduler | EncoderScheduler:
    """`tokenizer` is the scheduler's own copy (stop strings are decoded in the scheduler's thread)."""
    hf_config = load_hf_config(args.model_path)
    model_cls = get_model_class(list(getattr(hf_config, "architectures", None) or []), args.is_embedding)
    if getattr(model_cls, "bidirectional", False):
        return EncoderScheduler(EncoderRunner(args, progress=progress))
    runner = ModelRunner(args, hf_config, progress=progress)
    eos = eos_token_ids(args.model_path, runner.hf_config, tokenizer)
    return Scheduler(runner, eos, StopChecker(tokenizer) if tokenizer is not None else None,
                     GrammarCache(tokenizer, runner.vocab_size, eos) if tokenizer is not None else None)

