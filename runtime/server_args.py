"""Every knob of the runtime and the server, with the defaults of API.md."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch is imported only where a value needs it: the server's HTTP process parses these arguments before it
# spawns the engine, and importing torch first (about 3 s) would hold back the engine's model load by as much.
_PLAIN_DEVICE = re.compile(r"(cpu|cuda)(:(0|[1-9][0-9]*))?")

NO_CHUNK_STEP_TOKENS = 16384


@dataclass
class ServerArgs:
    model_path: str | None = None          # None: the embedded default model
    tokenizer_path: str | None = None      # None: model_path
    host: str = "127.0.0.1"
    port: int = 30000
    dtype: str = "auto"                    # auto: float32 on CPU, bfloat16 on GPU
    device: str | None = None              # None: cuda if present, else cpu
    is_embedding: bool = False
    skip_tokenizer_init: bool = False
    context_length: int | None = None      # None: the model's max_position_embeddings
    max_running_requests: int = 256
    max_total_tokens: int | None = None    # KV pool size in tokens; None: mem_fraction_static
    chunked_prefill_size: int = 2048       # most prompt tokens one step prefills; -1: no chunking (SGLang)
    page_size: int = 1
    disable_radix_cache: bool = False
    mem_fraction_static: float | None = None  # None: 0.85 of free GPU memory, 0.1 of free RAM on CPU
    random_seed: int = 0
    weight_version: str = "default"
    api_key: str | None = None
    admin_api_key: str | None = None       # control routes need it (then not api_key); docs/api.md, "Limits"
    log_level: str = "info"
    attention_backend: str | None = None   # torch, triton or flashinfer; None: triton on CUDA, else torch
    # Batch-invariant mode (runtime/deterministic.py); `deterministic` is its short alias.
    enable_deterministic_inference: bool = False
    deterministic: bool = False
    num_threads: int | None = None         # torch intra-op threads on CPU; None: leave the process's as is
    # Broadcast updates: "direct" receives into the parameters (as fast as a raw broadcast; a peer dying
    # mid-broadcast leaves them unusable: 503 until the next good update), "buffered" receives whole first
    # (the old weights keep serving on a dead peer). docs/api.md, "Weight updates".
    weight_update_receive: str = "direct"
    enable_metrics: bool = False           # GET /metrics in Prometheus text format (SGLang's flag)
    incremental_streaming_output: bool = False  # streamed chunks carry only the new output_ids / text
    # MoE models: the expert distribution record (runtime/expert_distribution.py; docs/api.md).
    expert_distribution_recorder_mode: str = "stat"      # stat | per_pass | per_token
    expert_distribution_recorder_buffer_size: int = -1   # passes (per_pass) or tokens (per_token) kept; -1: all
    expert_distribution_dir: str | None = None           # None: $SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR, else tmp
    # Decode steps of up to cuda_graph_max_bs requests replay CUDA graphs captured at start-up (CUDA only).
    disable_cuda_graph: bool = False
    cuda_graph_max_bs: int = 256
    # Limits of the HTTP front end (docs/api.md, "Limits"): 413 / 429 / 408 / 400 with the JSON error body.
    max_request_bytes: int = 32 << 20      # a body over it is a 413 (every route but tensor updates)
    max_weight_request_bytes: int = 16 << 30  # /update_weights_from_tensor: weights in base64
    request_read_timeout: float = 30.0     # seconds without a byte of a body that is still due: 408
    max_queued_requests: int = 16384       # samples waiting or running; more is a 429 with Retry-After
    max_n: int = 1024                      # sampling_params.n above it is a 400

    def __post_init__(self) -> None:
        if self.device is None:
            import torch

            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.attention_backend is None:
            self.attention_backend = "triton" if self.device_type == "cuda" else "torch"
        if self.page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {self.page_size}.")
        if self.chunked_prefill_size < 1 and self.chunked_prefill_size != -1:
            raise ValueError(f"chunked_prefill_size must be at least 1, or -1 (no chunking), got "
                             f"{self.chunked_prefill_size}.")
        if self.max_running_requests < 1:
            raise ValueError(f"max_running_requests must be at least 1, got {self.max_running_requests}.")
        if self.expert_distribution_recorder_mode not in ("stat", "per_pass", "per_token"):
            raise ValueError(f"expert_distribution_recorder_mode must be stat, per_pass or per_token, got "
                             f"{self.expert_distribution_recorder_mode!r}.")
        if self.cuda_graph_max_bs < 1:
            raise ValueError(f"cuda_graph_max_bs must be at least 1, got {self.cuda_graph_max_bs}.")
        for name in ("max_request_bytes", "max_weight_request_bytes", "max_queued_requests", "max_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if not self.request_read_timeout > 0:
            raise ValueError(f"request_read_timeout must be a positive number of seconds, got "
                             f"{self.request_read_timeout}.")
        if self.weight_update_receive not in ("direct", "buffered"):
            raise ValueError(f"weight_update_receive must be 'direct' or 'buffered', got "
                             f"{self.weight_update_receive!r}.")
        if self.deterministic or self.enable_deterministic_inference:
            self.deterministic = self.enable_deterministic_inference = True
            # Batch-invariant kernels exist for CPU (torch) and CUDA (Triton); elsewhere refusing beats a
            # silent broken promise. (Imported here: parsing arguments needs neither the kernels nor torch.)
            import torch

            from runtime.deterministic import check_supported

            check_supported(torch.device(self.device), attention_backend=self.attention_backend)

    @property
    def chunked_prefill(self) -> bool:
        """False with chunked_prefill_size -1: a prompt is prefilled whole, in one step."""
        return self.chunked_prefill_size != -1

    @property
    def prefill_step_tokens(self) -> int:
        """Most prompt tokens one step prefills. Without chunking a step still stops admitting prompts past
        NO_CHUNK_STEP_TOKENS (SGLang's max_prefill_tokens default); a longer prompt runs alone."""
        return self.chunked_prefill_size if self.chunked_prefill else NO_CHUNK_STEP_TOKENS

    @property
    def device_type(self) -> str:
        """torch.device(device).type ("cpu" for "cpu", "cuda" for "cuda:1"), without importing torch for
        the plain names; anything else is torch's to read (and to refuse)."""
        match = _PLAIN_DEVICE.fullmatch(self.device)
        if match:
            return match.group(1)
        import torch

        return torch.device(self.device).type

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        if self.dtype == "auto":
            return torch.float32 if self.device_type == "cpu" else torch.bfloat16
        names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
        if self.dtype not in names:
            raise ValueError(f"dtype must be one of auto, {', '.join(names)}; got {self.dtype!r}.")
        return names[self.dtype]

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def set_process_threads(args: ServerArgs) -> None:
    """Set torch's intra-op thread count to `args.num_threads` (on CPU; None leaves it). It is the whole
    process's setting: called by whoever owns the process (the server's engine process at start, or the
    in-process Engine only when its caller passed num_threads), never by a model runner."""
    if args.num_threads and args.device == "cpu":
        import torch

        torch.set_num_threads(args.num_threads)
