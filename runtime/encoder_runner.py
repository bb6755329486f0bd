"""Owns a bidirectional encoder (BERT-style) and runs one packed forward pass over whole sequences.

No KV pool: an encoder's tokens attend to later tokens, so nothing computed for a sequence can be
cached or chunked; each step runs complete sequences, packed without padding.
"""

from __future__ import annotations

import logging

import torch

from runtime.attention.bidirectional import PackedLayout
from runtime.model_runner import load_hf_config
from runtime.models.bert import EncoderBatch
from runtime.models.registry import get_model_class
from runtime.server_args import ServerArgs
from runtime.weight_loader import load_model_weights

logger = logging.getLogger(__name__)


class EncoderRunner:
    def __init__(self, args: ServerArgs, progress: bool = True):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = args.torch_dtype
        self.hf_config = load_hf_config(args.model_path)
        model_cls = get_model_class(list(getattr(self.hf_config, "architectures", None) or []), is_embedding=True)
        with torch.device(self.device):
            model = model_cls(self.hf_config)
        model.to(self.dtype)
        load_model_weights(model, args.model_path, progress=progress)
        self.model = model.eval()
        self.vocab_size = self.hf_config.vocab_size
        self.type_vocab_size = getattr(self.hf_config, "type_vocab_size", 1)
        # The context bounds a sequence including the end: one more than the longest accepted input, as
        # for decoders (a prompt of context_len tokens is refused).
        self.context_len = min(args.context_length or model.max_positions, model.max_positions) + 1
        logger.info("Encoder %s loaded: %s, dtype %s, device %s.", args.model_path, model_cls.__name__,
                    self.dtype, self.device)

    def memory_released(self) -> None:
        """The weights were freed: on CUDA, give the memory back to the device."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def memory_resumed(self) -> None:
        pass

    @torch.inference_mode()
    def forward(self, input_ids: list[list[int]], token_type_ids: list[list[int] | None]) -> torch.Tensor:
        """The model's pooled output per sequence, fp32 [B, out]."""
        dev = self.device
        lens = [len(ids) for ids in input_ids]
        types = [t if t is not None else [0] * n for t, n in zip(token_type_ids, lens)]
        batch = EncoderBatch(
            input_ids=torch.tensor([t for ids in input_ids for t in ids], device=dev),
            token_type_ids=torch.tensor([t for ts in types for t in ts], device=dev),
            positions=torch.cat([torch.arange(n) for n in lens]).to(dev),
            layout=PackedLayout.build(lens, dev))
        return self.model(batch)
