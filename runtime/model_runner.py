"""Owns the model, its KV pool and attention backend; runs one forward step and returns logits."""

from __future__ import annotations

import logging
import os

import torch
from transformers import AutoConfig, PretrainedConfig

from runtime.attention.registry import create_attention_backend
from runtime.cuda_graph_runner import CudaGraphRunner
from sync.flat_parameters import flatten_parameters
from runtime.forward_batch import ForwardBatch
from runtime.kv_pool import KVPool
from runtime.models.moe_layout import moe_layout
from runtime.models.registry import get_model_class
from runtime.routed_experts_pool import RoutedExpertsPool
from runtime.routing_capture import RoutingCapture
from runtime.server_args import ServerArgs
from runtime.weight_loader import load_model_weights

logger = logging.getLogger(__name__)


def load_hf_config(model_path: str) -> PretrainedConfig:
    return AutoConfig.from_pretrained(model_path)


class ModelRunner:
    def __init__(self, args: ServerArgs, hf_config: PretrainedConfig | None = None, progress: bool = True):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = args.torch_dtype
        self.hf_config = hf_config or load_hf_config(args.model_path)
        self.context_len = args.context_length or self.hf_config.max_position_embeddings
        self.vocab_size = self.hf_config.vocab_size

        model_cls = get_model_class(list(getattr(self.hf_config, "architectures", None) or []), args.is_embedding)
        with torch.device(self.device):
            model = model_cls(self.hf_config, max_positions=self.context_len)
        model.to(self.dtype)
        model.model.rotary.float()  # cos/sin tables stay fp32, cast per step like transformers does
        load_model_weights(model, args.model_path, progress=progress)
        # One storage in checkpoint order: broadcast buckets are received straight into the weights.
        self.flat_weights = flatten_parameters(model)
        self.model = model.eval()

        attn = model.model.layers[0].self_attn
        self.num_layers = len(model.model.layers)
        num_slots = self._kv_slots(attn.num_kv_heads, attn.head_dim)
        num_slots -= num_slots % args.page_size
        if num_slots < self.context_len:
            # A request longer than the KV pool could never run (it would wait forever): requests are
            # bounded by the pool as by the context (SGLang's max_req_len does the same).
            logger.warning("KV pool of %d tokens is below the context length %d; requests are limited to %d "
                           "tokens.", num_slots, self.context_len, num_slots)
            self.context_len = num_slots
        self.kv_pool = KVPool(self.num_layers, num_slots, attn.num_kv_heads, attn.head_dim, self.dtype, self.device)
        backend_name = args.attention_backend
        if args.enable_deterministic_inference:
            from runtime.deterministic import make_batch_invariant
            backend_name = make_batch_invariant(model, self.device, args.attention_backend)
        self.backend = create_attention_backend(backend_name, self.kv_pool)
        # MoE models: every step records its routing beside the KV it writes (for routed experts and the
        # expert distribution record); dense models record nothing.
        self.moe_layout = moe_layout(self.hf_config, args.is_embedding)
        self.routed_experts: RoutedExpertsPool | None = None
        if self.moe_layout is not None:
            self.routed_experts = RoutedExpertsPool(num_slots, self.moe_layout, self.device)
            self.kv_pool.routed_experts = self.routed_experts
        self.graph_runner: CudaGraphRunner | None = None
        self.capture_cuda_graphs()
        logger.info("Model %s loaded: %d layers, KV pool of %d tokens (%.1f MiB), dtype %s, device %s.",
                    args.model_path, self.num_layers, num_slots, self.kv_pool.nbytes() / 2**20, self.dtype,
                    self.device)

    def _kv_slots(self, num_kv_heads: int, head_dim: int) -> int:
        if self.args.max_total_tokens is not None:
            return self.args.max_total_tokens
        per_token = KVPool.bytes_per_token(self.num_layers, num_kv_heads, head_dim, self.dtype)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * (self.args.mem_fraction_static or 0.85)
        else:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            budget = free * (self.args.mem_fraction_static or 0.1)
        # More than a few full contexts per running request is never used.
        cap = self.context_len * self.args.max_running_requests
        return int(max(min(budget // per_token, cap), self.context_len))

    def cuda_graphs_wanted(self) -> bool:
        """CUDA graphs for decode: on CUDA, unless disabled, with a backend and model that allow them
        (MoE layers count tokens per expert on the host, which a graph cannot)."""
        return (self.device.type == "cuda" and not self.args.disable_cuda_graph and not self.args.is_embedding
                and self.backend.supports_cuda_graph and getattr(self.model, "supports_cuda_graph", True))

    def capture_cuda_graphs(self, capture: bool = True) -> None:
        """Capture decode graphs (runtime/cuda_graph_runner.py) if wanted; capture=False builds the same
        static-buffer path run eagerly, whatever the device (for tests)."""
        if capture and not self.cuda_graphs_wanted():
            return
        attn = self.model.model.layers[0].self_attn
        self.graph_runner = CudaGraphRunner(
            self.model, self.backend, self.kv_pool.pad_slot,
            min(self.args.cuda_graph_max_bs, self.args.max_running_requests), self.context_len,
            attn.num_heads, attn.head_dim, self.device, capture=capture)

    def memory_released(self) -> None:
        """The KV pool or the weights were freed: graphs holding their addresses go, and on CUDA the freed
        memory returns to the device (a colocated trainer can allocate it)."""
        self.graph_runner = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def memory_resumed(self) -> None:
        """Everything is back (at new addresses): capture the graphs again."""
        if self.graph_runner is None:
            self.capture_cuda_graphs()

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits (fp32) of the rows batch.logits_indices names, [R, vocab]."""
        if self.graph_runner is not None and self.graph_runner.can_run(batch):
            return self.graph_runner.replay(batch)
        self.backend.prepare(batch)
        if self.routed_experts is not None and batch.routing is None:
            batch.routing = RoutingCapture()
        hidden = self.model(batch, self.backend)
        if self.routed_experts is not None:
            self.routed_experts.write(batch.out_slots, batch.routing)
        return self.model.compute_logits(hidden[batch.logits_indices])
