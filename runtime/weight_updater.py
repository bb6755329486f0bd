"""The model's side of hot weight updates: disk, broadcast groups, tensors, reads, and releasing memory.

It knows the model and the weight-update groups, not the requests: `runtime.control.Controller` decides
when an update runs and what the scheduler does around it. Every update validates before the first copy
(names, shapes and dtypes against the model), so a refused update raises `WeightUpdateError` with the
model untouched. A broadcast is received directly into the parameters where it can be (receive mode
"direct", the default: see sync.model_receiver), so a peer that dies mid-broadcast raises
`PartialUpdateError` (the model is a mix) as a checkpoint file that breaks while being copied does; in
mode "buffered" a broadcast is received whole before anything is copied, and a dead peer leaves the model
untouched (`BroadcastError`).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from runtime.messages import InitWeightsUpdateGroupReq, UpdateWeightsFromDistributedReq
from sync.disk import update_weights_from_disk
from sync.errors import BroadcastError, PartialUpdateError, WeightUpdateError
from sync.named_tensors import apply_named_tensors
from sync.process_group import destroy_process_group, group_store, init_custom_process_group, tcp_init_method
from sync.model_receiver import ModelReceiver
from sync.report import UpdateReport
from sync.scratch import ScratchBuffer
from sync.safetensors_payload import decode_named_tensors
from sync.specs import TensorSpecs, parse_dtype
from sync.targets import check_specs

logger = logging.getLogger(__name__)

DISK_LOAD_FORMATS = (None, "auto", "safetensors")
TENSOR_LOAD_FORMATS = (None, "auto", "safetensors")
DISTRIBUTED_LOAD_FORMATS = (None, "auto", "flattened_bucket")
# /get_weights_by_name answers one JSON document (built and sent in one piece): at most this many values.
MAX_WEIGHT_VALUES = 1 << 18


def default_backend(device: torch.device) -> str:
    """The broadcast backend a group gets when the trainer names none: NCCL between CUDA devices, gloo
    (CPU tensors) otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


class _Group:
    def __init__(self, group: dist.ProcessGroup, backend: str, timeout: float, where: str):
        self.group = group
        self.backend = backend
        self.timeout = timeout
        self.where = where


class WeightUpdater:
    def __init__(self, model: torch.nn.Module, device: torch.device, tp_rank: int = 0,
                 receive_mode: str = "direct"):
        self.model = model
        self.receiver = ModelReceiver(model, receive_mode)
        self.device = device
        self.tp_rank = tp_rank
        self.groups: dict[str, _Group] = {}
        self.released = False
        # The disk read buffer, kept between updates (fresh pages cost more than the read): the largest file.
        self.disk_scratch = ScratchBuffer()
        # Parameter storages and their CPU backups while released (one entry per storage: tied weights once).
        self._storages: list[tuple[torch.UntypedStorage, int, torch.Tensor | None]] = []

    # --- updates --------------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self.released:
            raise WeightUpdateError("The weights are released (release_memory_occupation); resume them first.")

    def from_disk(self, model_path: str, load_format: str | None,
                  digests: dict[str, int] | None = None) -> UpdateReport:
        self._check_usable()
        if load_format not in DISK_LOAD_FORMATS:
            raise WeightUpdateError(f"load_format={load_format!r} is not supported from disk; use one of "
                                    f"{[f for f in DISK_LOAD_FORMATS if f]}.")
        return update_weights_from_disk(self.model, model_path, digest=False, digests=digests,
                                        scratch=self.disk_scratch)

    def from_named_tensors(self, named: list[tuple[str, torch.Tensor]],
                           digests: dict[str, int] | None = None) -> UpdateReport:
        """The caller's tensors (in-process) copied straight into the model: no copy but the in-place one."""
        self._check_usable()
        if not isinstance(named, (list, tuple)) or any(not isinstance(p, (list, tuple)) or len(p) != 2
                                                       or not isinstance(p[0], str) for p in named):
            raise WeightUpdateError("named_tensors must be a list of (name, tensor) pairs.")
        return apply_named_tensors(self.model, named, digest=False, digests=digests)

    def from_serialized(self, payloads: list[str], load_format: str | None,
                        digests: dict[str, int] | None = None) -> UpdateReport:
        self._check_usable()
        if load_format not in TENSOR_LOAD_FORMATS:
            raise WeightUpdateError(f"load_format={load_format!r} is not supported for tensors; the payload is "
                                    "base64 safetensors bytes (sync.encode_named_tensors).")
        if not payloads:
            raise WeightUpdateError("serialized_named_tensors is empty.")
        # One payload per tensor-parallel rank, as SGLang sends them; this rank reads its own.
        if self.tp_rank >= len(payloads):
            raise WeightUpdateError(f"serialized_named_tensors has {len(payloads)} entries; rank {self.tp_rank} "
                                    "has none.")
        named = decode_named_tensors(payloads[self.tp_rank])
        return apply_named_tensors(self.model, named, digest=False, digests=digests)

    # --- broadcast groups -----------------------------------------------------------------------

    def init_group(self, msg: InitWeightsUpdateGroupReq) -> str:
        """Join in the caller's thread (the in-process API); the scheduler uses start_join / finish_join."""
        self.check_join(msg)
        return self.add_group(msg.group_name, self.join(msg))

    def check_join(self, msg: InitWeightsUpdateGroupReq) -> None:
        """What can be refused at once, before a join starts."""
        if msg.group_name in self.groups:
            raise WeightUpdateError(f"A weight-update group named {msg.group_name!r} already exists "
                                    f"({self.groups[msg.group_name].where}); destroy it first.")
        backend = msg.backend or default_backend(self.device)
        if backend == "nccl" and self.device.type != "cuda":
            raise WeightUpdateError(f"backend='nccl' needs a CUDA device; this server runs on {self.device.type}"
                                    " (use backend='gloo').")

    def join(self, msg: InitWeightsUpdateGroupReq) -> "_Group":
        """Join the trainer's group (blocks up to msg.timeout; GroupJoinError names the address). Touches no
        state of this object, so it may run on a helper thread while the scheduler keeps generating."""
        backend = msg.backend or default_backend(self.device)
        rank = msg.rank_offset + self.tp_rank
        init_method = tcp_init_method(msg.master_address, msg.master_port)
        group = init_custom_process_group(backend, init_method, msg.world_size, rank, msg.group_name,
                                          timeout=msg.timeout)  # GroupJoinError names the address
        where = f"{init_method}, rank {rank} of {msg.world_size}, {backend}"
        return _Group(group, backend, msg.timeout, where)

    def add_group(self, name: str, g: "_Group") -> str:
        if name in self.groups:  # joined twice at once: keep the first, drop this one
            destroy_process_group(g.group)
            raise WeightUpdateError(f"A weight-update group named {name!r} already exists ({self.groups[name].where}).")
        self.groups[name] = g
        return g.where

    def destroy_group(self, group_name: str) -> None:
        g = self.groups.pop(group_name, None)
        if g is None:
            raise WeightUpdateError(f"No weight-update group named {group_name!r}; known: {sorted(self.groups)}.")
        self.receiver.drop_scratch(group_name)
        destroy_process_group(g.group)

    def from_distributed(self, msg: UpdateWeightsFromDistributedReq) -> UpdateReport:
        """Receive one request's tensors from rank 0 into the model (sync.model_receiver says how).

        Announced specs that do not fit the model are still received (into scratch buffers) before the
        refusal, so the trainer's broadcast completes instead of blocking until the group timeout.
        """
        g = self.groups.get(msg.group_name)
        if g is None:
            raise WeightUpdateError(f"No weight-update group named {msg.group_name!r}; call "
                                    f"/init_weights_update_group first (known: {sorted(self.groups)}).")
        if msg.load_format not in DISTRIBUTED_LOAD_FORMATS:
            raise WeightUpdateError(f"load_format={msg.load_format!r} is not supported; use null (one broadcast "
                                    "per tensor) or 'flattened_bucket'.")
        try:
            specs = TensorSpecs(msg.names, msg.dtypes, msg.shapes)
            for d in specs.dtypes:
                parse_dtype(d)
        except ValueError as e:  # cannot even size the buffers: nothing to drain
            raise WeightUpdateError(f"Bad tensor specs: {e}") from None
        refusal: WeightUpdateError | None = None
        targets = None
        try:
            self._check_usable()
            targets = check_specs(self.model, specs)
            extra = sorted(set(msg.digests or {}) - set(specs.names))
            if extra:
                raise WeightUpdateError(f"digests name {len(extra)} tensors this request does not carry, e.g. "
                                        f"{extra[:3]}")
        except WeightUpdateError as e:
            refusal = e
        device = "cpu" if g.backend == "gloo" else self.device
        try:
            if msg.load_format == "flattened_bucket":
                report = self.receiver.receive_bucket(g.group, msg.group_name, specs, targets, device, msg.digests)
            else:
                report = self.receiver.receive_tensors(g.group, specs, targets, device, msg.digests)
        except (BroadcastError, PartialUpdateError) as e:
            raise type(e)(f"{e} (group {msg.group_name!r}: {g.where}, timeout {g.timeout:g} s)") from e
        if g.backend == "nccl":
            # NCCL receives on its own stream; the forward passes run on this one. Wait here, so the next
            # step (and the update's reported time) sees the weights landed, whatever stream it uses.
            torch.cuda.current_stream(self.device).synchronize()
        if refusal is not None:
            raise refusal
        return report

    def dead_groups(self) -> list[str]:
        """Groups whose trainer is gone: its store (hosted in the trainer's process) no longer answers."""
        dead = []
        for name, g in self.groups.items():
            try:
                group_store(g.group).check(["liveness"])
            except Exception:
                dead.append(name)
        return dead

    # --- reads ----------------------------------------------------------------------------------

    def get_weights(self, name: str, truncate_size: int) -> list:
        """The first `truncate_size` rows (elements of a vector) of an HF-named weight, as nested lists."""
        self._check_usable()
        try:
            target = self.model.weight_target(name)
        except KeyError:
            raise WeightUpdateError(f"Unknown weight {name}: the model has no parameter of that name.") from None
        if target is None:
            if name == "lm_head.weight" and getattr(self.model, "tie_word_embeddings", False):
                target = self.model.weight_target("model.embed_tokens.weight")  # tied: the same tensor
            else:
                raise WeightUpdateError(f"Weight {name} is not kept by the model (a computed buffer).")
        rows = target[:truncate_size]
        if rows.numel() > MAX_WEIGHT_VALUES:  # the answer is one JSON document: keep it small
            raise WeightUpdateError(f"truncate_size={truncate_size} asks for {rows.numel()} values of {name} (shape "
                                    f"{list(target.shape)}); at most {MAX_WEIGHT_VALUES} per call: ask for fewer rows.")
        return rows.detach().float().cpu().tolist()

    # --- memory ---------------------------------------------------------------------------------

    def release(self) -> None:
        """Free the parameters' memory; on an accelerator keep a CPU copy to restore on resume. On the CPU
        there is nowhere cheaper to keep them: the values are dropped and must be pushed again."""
        if self.released:
            return
        # Collect first: after resize_(0) a storage's data_ptr is 0, so deduplicating while resizing would
        # list a storage shared by many parameters (sync.flat_parameters) once more, as empty.
        storages: dict[int, torch.UntypedStorage] = {}
        for p in self.model.parameters():
            storage = p.data.untyped_storage()
            storages.setdefault(storage.data_ptr(), storage)
        for storage in storages.values():
            backup = None
            if self.device.type != "cpu":
                backup = torch.empty(storage.nbytes(), dtype=torch.uint8)
                backup.untyped_storage().copy_(storage)
            self._storages.append((storage, storage.nbytes(), backup))
            storage.resize_(0)  # the Parameter objects (and views into them) stay; only memory goes
        self.disk_scratch.clear()
        self.receiver.drop_scratch()  # receive buffers too: a colocated trainer wants that memory
        self.released = True

    def resume(self) -> bool:
        """Take the memory again; True when the old values came back (a CPU backup existed)."""
        if not self.released:
            return True
        restored = True
        for storage, nbytes, backup in self._storages:
            storage.resize_(nbytes)
            if backup is not None:
                storage.copy_(backup.untyped_storage())
            else:
                restored = False
        self._storages.clear()
        self.released = False
        return restored
