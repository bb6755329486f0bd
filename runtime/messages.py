"""Typed messages between the front end (Engine or HTTP process) and the scheduler.

They are msgspec Structs so the same objects travel in-process (Engine) and over ZeroMQ (server),
encoded with msgpack, never pickle.
"""

from __future__ import annotations

import msgspec

from runtime.sampling_params import SamplingParams


class GenerateRequest(msgspec.Struct, tag=True, kw_only=True):
    """One sample of one prompt: a front end expands n > 1 into n of these with the same input_ids."""

    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    token_ids_logprob: list[int] | None = None
    stream: bool = False
    return_sampling_mask: bool = False   # report each output token's sampling support (runtime/token_support.py)
    # MoE models: return the experts of positions [routed_experts_start_len, seq_len - 1) (SGLang's fields).
    return_routed_experts: bool = False
    routed_experts_start_len: int = 0


class EmbedRequest(msgspec.Struct, tag=True, kw_only=True):
    """Score one sequence with the model's head (/encode, /classify, /v1/rerank): no token is generated.

    The answer is a RequestOutput whose `embedding` is the head's output for the last token (decoder
    reward / embedding models) or the pooled sequence (encoders)."""

    rid: str
    input_ids: list[int]
    token_type_ids: list[int] | None = None   # segment ids of a sentence pair (BERT-style encoders)


class AbortRequest(msgspec.Struct, tag=True, kw_only=True):
    rid: str = ""
    abort_all: bool = False


class FlushCacheRequest(msgspec.Struct, tag=True, kw_only=True):
    pass


class FlushCacheResult(msgspec.Struct, tag=True, kw_only=True):
    success: bool
    message: str = ""


# A logprob entry is (logprob, token_id); the front end adds the text.
LogprobEntry = tuple[float, int]


class RequestOutput(msgspec.Struct, tag=True, kw_only=True):
    """What one scheduler step produced for one request: the delta since the previous output.

    Input-side logprobs arrive once, with the first output of the request.
    """

    rid: str
    new_token_ids: list[int]
    prompt_tokens: int
    cached_tokens: int
    weight_version: str
    finished: bool = False
    finish_reason: dict | None = None
    # Delta lists, aligned with new_token_ids, filled only when the request asked for logprobs.
    output_token_logprobs: list[float] = []
    output_top_logprobs: list[list[LogprobEntry]] = []
    output_token_ids_logprobs: list[list[LogprobEntry]] = []
    output_token_weight_versions: list[str] = []
    # Whole lists, sent once (positions logprob_start_len .. prompt_tokens - 1; the first is None).
    input_token_logprobs: list[float | None] | None = None
    input_top_logprobs: list[list[LogprobEntry] | None] | None = None
    input_token_ids_logprobs: list[list[LogprobEntry] | None] | None = None
    embedding: list[float] | None = None   # an EmbedRequest's result, with its final output
    # Aligned with new_token_ids when the request asked for them: kept token ids, None = no truncation.
    output_sampling_masks: list[list[int] | None] = []
    # With return_routed_experts, on the final output: little-endian int16 [tokens, MoE layers, top_k].
    routed_experts: bytes | None = None
    routed_experts_shape: list[int] | None = None


SchedulerInput = GenerateRequest | EmbedRequest | AbortRequest | FlushCacheRequest


# --- what the HTTP server's engine process also sends (rollout/); every scheduler answers them -------
# Control messages travel on the same queue as requests, so the engine answers them in order.


class AbortRequestsExact(msgspec.Struct, tag=True, kw_only=True):
    """Abort exactly these rids (not by prefix): what the server sends when a client disconnects."""

    rids: list[str]
    message: str = "Aborted: the client disconnected."


class HealthCheckRequest(msgspec.Struct, tag=True, kw_only=True):
    id: int


class HealthCheckResult(msgspec.Struct, tag=True, kw_only=True):
    id: int
    error: str | None = None  # set once the scheduler loop failed (runtime/scheduler_loop.py): unhealthy


class ServerStateRequest(msgspec.Struct, tag=True, kw_only=True):
    id: int


class ServerStateResult(msgspec.Struct, tag=True, kw_only=True):
    """Live state of the scheduler: load, KV pool and radix cache (runtime/scheduler.py's `state()`)."""

    id: int
    state: dict


class EngineReady(msgspec.Struct, tag=True, kw_only=True):
    """The engine process's first message: the model is loaded and the scheduler runs."""

    vocab_size: int
    context_len: int
    max_total_num_tokens: int
    max_running_requests: int
    weight_version: str
    device: str
    dtype: str


class EngineFailed(msgspec.Struct, tag=True, kw_only=True):
    """The engine process could not start (sent instead of EngineReady), or hit a fatal error."""

    message: str


class EngineState(msgspec.Struct, tag=True, kw_only=True):
    """Pushed by the engine when its state changes outside a control answer: the weights became unusable
    (a trainer died between buckets), or the scheduler loop failed (`failed`: a bug; nothing runs)."""

    weight_version: str
    unusable: str | None = None
    paused: bool = False
    failed: str | None = None


# --- weight updates and generation control (issue 4) -------------------------------------------------
# Each carries an `id` so its result finds its caller; the scheduler applies them between steps, in the
# order they arrive among requests. Shared by the in-process Engine and the server's engine process.


class UpdateWeightsFromDiskReq(msgspec.Struct, tag=True, kw_only=True):
    id: int
    model_path: str
    load_format: str | None = None
    weight_version: str | None = None
    flush_cache: bool = True
    digests: dict[str, int] | None = None  # CRC-32 per HF name (sync.checksum), verified before applying
    abort_all_requests: bool = False


class InitWeightsUpdateGroupReq(msgspec.Struct, tag=True, kw_only=True):
    id: int
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = "weight_update_group"
    backend: str | None = None  # None: "nccl" on a CUDA server, "gloo" on a CPU one (API.md's "nccl" on GPUs)
    timeout: float = 300.0  # seconds: the join, and later every broadcast on the group


class UpdateWeightsFromDistributedReq(msgspec.Struct, tag=True, kw_only=True):
    id: int
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = "weight_update_group"
    load_format: str | None = None  # None: one broadcast per tensor; "flattened_bucket": one flat buffer
    weight_version: str | None = None
    flush_cache: bool = True
    digests: dict[str, int] | None = None  # CRC-32 per HF name (sync.checksum), verified before applying


class DestroyWeightsUpdateGroupReq(msgspec.Struct, tag=True, kw_only=True):
    id: int
    group_name: str = "weight_update_group"


class UpdateWeightsFromTensorReq(msgspec.Struct, tag=True, kw_only=True):
    """Over the wire: base64 safetensors payloads (sync.safetensors_payload), never pickle."""

    id: int
    # base64 text. From the HTTP server the list is empty on the wire: the payloads travel as the frames
    # after this message's, uncopied, and the engine puts views of their text here (rollout/server/ipc.py).
    serialized_named_tensors: list[str]
    load_format: str | None = None
    weight_version: str | None = None
    flush_cache: bool = True
    digests: dict[str, int] | None = None  # CRC-32 per HF name (sync.checksum), verified before applying
    attached_payloads: int = 0  # how many frames after the message frame are this message's payloads


class UpdateWeightsFromLocalTensorsReq(msgspec.Struct, tag=True, kw_only=True):
    """In-process only (runtime.Engine): the caller's tensors themselves, copied once, in place. Never
    encoded, so it is not part of the ZeroMQ wire format (rollout/server/ipc.py)."""

    id: int
    named_tensors: list  # list[tuple[str, torch.Tensor]]
    weight_version: str | None = None
    flush_cache: bool = True
    digests: dict[str, int] | None = None  # CRC-32 per HF name (sync.checksum), verified before applying


class GetWeightsByNameReq(msgspec.Struct, tag=True, kw_only=True):
    id: int
    name: str
    truncate_size: int = 100


class UpdateWeightVersionReq(msgspec.Struct, tag=True, kw_only=True):
    id: int
    new_version: str
    abort_all_requests: bool = False


class PauseGenerationReq(msgspec.Struct, tag=True, kw_only=True):
    id: int
    mode: str = "abort"  # "abort" | "retract" | "in_place"


class ContinueGenerationReq(msgspec.Struct, tag=True, kw_only=True):
    id: int


class ReleaseMemoryReq(msgspec.Struct, tag=True, kw_only=True):
    id: int
    tags: list[str] | None = None  # None: every tag ("kv_cache", "weights")


class ResumeMemoryReq(msgspec.Struct, tag=True, kw_only=True):
    id: int
    tags: list[str] | None = None


class ControlResult(msgspec.Struct, tag=True, kw_only=True):
    """The answer to any control message above. `unusable` is set when the weights cannot serve (a broken
    update, released weights): generation is refused with it (HTTP 503) until the next good update."""

    id: int
    success: bool
    message: str
    weight_version: str
    unusable: str | None = None
    paused: bool = False
    parameter: list | None = None      # get_weights_by_name
    report: dict | None = None         # what an update applied: names count, bytes, seconds, digest


class ExpertDistributionReq(msgspec.Struct, tag=True, kw_only=True):
    """/start_, /stop_, /dump_expert_distribution_record (runtime/expert_distribution.py); answered by a
    ControlResult whose `report` holds a dump's paths and summary."""

    id: int
    action: str  # "start" | "stop" | "dump"


ControlRequest = (UpdateWeightsFromDiskReq | InitWeightsUpdateGroupReq | UpdateWeightsFromDistributedReq
                  | DestroyWeightsUpdateGroupReq | UpdateWeightsFromTensorReq | GetWeightsByNameReq
                  | UpdateWeightVersionReq | PauseGenerationReq | ContinueGenerationReq | ReleaseMemoryReq
                  | ResumeMemoryReq | ExpertDistributionReq)
