"""Hot weight updates: the building blocks the Engine, scheduler and trainer-side client use. Imports
neither `runtime` nor `rollout`, so a trainer can import it alone.

- `apply_named_tensors` (validate all, then copy in place) writes HF-named tensors into a running model.
- `update_weights_from_disk`: a local safetensors checkpoint, headers checked first, one file at a time.
- `init_custom_process_group` / `destroy_process_group`: the trainer's weight-update group (not the default).
- `WeightSender` (trainer) and `ModelReceiver` (server): broadcasts per tensor or in flat buckets
  (`flatten_bucket`, `unflatten_bucket`, `plan_buckets`, `layout_bucket`), received straight into the
  weights where they can be. The HTTP side of the protocol (announcing each bucket to every server) is
  the client's: `rollout.RolloutClient.update_weights_from_distributed`.
- `encode_named_tensors` / `decode_named_tensors`: the safetensors (never pickle) tensor payload.
- `flatten_parameters`: lay a (trainer's) model's parameters back to back so buckets go out with no copy.
- `tensor_checksum`, `model_checksums`, `update_digest`: verification.
Errors: `WeightUpdateError` (refused, model untouched), `PartialUpdateError` (model inconsistent),
`GroupJoinError`, `BroadcastError`.
"""

from sync.bucket import BucketMeta, flatten_bucket, layout_bucket, plan_buckets, unflatten_bucket
from sync.checksum import digest_of, model_checksums, named_checksums, tensor_checksum, update_digest
from sync.disk import checkpoint_specs, iterate_checkpoint, update_weights_from_disk, validate_checkpoint
from sync.errors import (BroadcastError, CheckpointNotFoundError, GroupJoinError, PartialUpdateError,
                         WeightUpdateError)
from sync.flat_parameters import flatten_parameters
from sync.model_receiver import ModelReceiver
from sync.named_tensors import apply_named_tensors
from sync.process_group import destroy_process_group, init_custom_process_group, tcp_init_method
from sync.report import UpdateReport
from sync.safetensors_payload import decode_named_tensors, encode_named_tensors
from sync.sender import WeightSender
from sync.specs import TensorSpecs
from sync.targets import check_specs

__all__ = [
    "BroadcastError", "BucketMeta", "CheckpointNotFoundError", "GroupJoinError", "ModelReceiver",
    "PartialUpdateError", "TensorSpecs", "UpdateReport", "WeightSender", "WeightUpdateError",
    "apply_named_tensors", "check_specs", "checkpoint_specs", "decode_named_tensors", "destroy_process_group",
    "digest_of", "encode_named_tensors", "flatten_bucket", "flatten_parameters", "init_custom_process_group",
    "iterate_checkpoint", "layout_bucket", "model_checksums", "named_checksums", "plan_buckets",
    "tcp_init_method", "tensor_checksum", "unflatten_bucket", "update_digest", "update_weights_from_disk",
    "validate_checkpoint",
]
