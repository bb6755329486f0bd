"""The scheduler's side of weight updates and generation control: what happens to requests and to the
prefix cache around an update, pause modes, versions, and the refuse-to-serve state.

Runs in the scheduler's thread, between steps, in the order messages arrive (the in-process Engine and
the server's engine process reach it through runtime/scheduler_base.py's `handle`, for decoder and encoder
schedulers alike: the same updates, versions, pause and reads; an encoder has no KV to invalidate).
Each message type has its handler in one table (`Controller._handlers`).

- Versions: every output token records `scheduler.weight_version` at the step that sampled it.
- Cache: after weights change, no KV computed under the old ones may be reused. Requests that hold KV
  (running, or paused in place) keep their own KV and go on, but it is marked stale (never inserted into
  the cache), and a cached prefix they hold is copied into slots of their own so the whole cache can be
  dropped (runtime/cache_manager.py's `detach_from_cache`). A request whose copy finds no memory is
  retracted instead (it recomputes under the new weights).
- Failures: a refused update leaves the model untouched (old weights serve). A failure that leaves the
  model a mix (a broken checkpoint copy, a broadcast that breaks while received directly into the
  weights, or one that breaks after earlier buckets of the same update were applied) sets
  `scheduler.unusable`: generation is refused with that message (HTTP 503) and in-flight requests are
  aborted, until the next successful update. Setting it also pushes an `EngineState` to the front end, so
  the HTTP process refuses generation (503) at once instead of learning it from the next control answer;
  requests aborted for it carry `status_code` 503 in their finish reason.
- Joins (`init_weights_update_group`) run on a helper thread (a trainer that never comes must not stall
  generation for the join's whole timeout): the scheduler polls it between steps, answers the join when it
  ends, and holds later control messages (not requests) until then, so they still apply in order.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Callable, Protocol

from runtime.messages import (ContinueGenerationReq, ControlResult, DestroyWeightsUpdateGroupReq, EngineState,
                              GetWeightsByNameReq, InitWeightsUpdateGroupReq, PauseGenerationReq, ReleaseMemoryReq,
                              ResumeMemoryReq, UpdateWeightsFromDiskReq, UpdateWeightsFromDistributedReq,
                              UpdateWeightsFromLocalTensorsReq, UpdateWeightsFromTensorReq, UpdateWeightVersionReq)
from runtime.group_join import GroupJoin
from runtime.heap_trim import release_free_heap
from runtime.weight_updater import WeightUpdater
from sync.errors import BroadcastError, CheckpointNotFoundError, PartialUpdateError, WeightUpdateError
from sync.report import UpdateReport

logger = logging.getLogger(__name__)

PAUSE_MODES = ("abort", "retract", "in_place")
WATCH_EVERY_S = 0.5  # while an update is in parts, how often generation checks that its trainer lives
MEMORY_TAGS = ("kv_cache", "weights")


class Controlled(Protocol):
    """What the controller needs of a scheduler: runtime/scheduler_base.py's SchedulerBase, which both
    runtime/scheduler.py's Scheduler (paged KV, prefix cache) and runtime/encoder_scheduler.py's
    EncoderScheduler (bidirectional encoders, no KV: its KV methods do nothing) provide."""

    runner: Any                 # .model (the HF-named weight interface), .device, .args, .memory_released()
    weight_version: str
    paused: str | None
    unusable: str | None
    memory_released: bool
    running: list

    def abort(self, rid: str = "", abort_all: bool = False, message: str = ..., *,
              status_code: int | None = None) -> list: ...

    def invalidate_kv(self) -> None: ...

    def retract_all(self) -> None: ...

    def release_kv_memory(self) -> bool: ...

    def resume_kv_memory(self) -> None: ...


class Controller:
    def __init__(self, scheduler: Controlled):
        self.s = scheduler
        self.updater = WeightUpdater(scheduler.runner.model, scheduler.runner.device,
                                     receive_mode=scheduler.runner.args.weight_update_receive)
        # Parts of an update (buckets, per-tensor requests without a weight_version) applied since the
        # last complete one: if the next part fails, the model holds a mix of two updates.
        self.partial_parts = 0
        self.kv_released = False
        self.num_updates = 0
        self.update_seconds = 0.0
        self._next_watch = 0.0
        self._join: GroupJoin | None = None            # a join running on its helper thread
        self._held: deque = deque()                # control messages that arrived during the join
        self._handlers: dict[type, Callable[[Any, list], ControlResult]] = {
            UpdateWeightsFromDiskReq: self._update_from_disk,
            UpdateWeightsFromDistributedReq: self._update_from_distributed,
            UpdateWeightsFromTensorReq: self._update_from_tensor,
            UpdateWeightsFromLocalTensorsReq: self._update_from_local_tensors,
            UpdateWeightVersionReq: self._update_weight_version,
            InitWeightsUpdateGroupReq: self._init_group,
            DestroyWeightsUpdateGroupReq: self._destroy_group,
            GetWeightsByNameReq: self._get_weights,
            PauseGenerationReq: self._pause,
            ContinueGenerationReq: self._continue,
            ReleaseMemoryReq: self._release_memory,
            ResumeMemoryReq: self._resume_memory,
        }

    def message_types(self) -> list[type]:
        """The control messages handle() answers."""
        return list(self._handlers)

    def poll(self) -> list:
        """Between steps (every loop turn, busy or not): answer a finished join and what waited for it, and if
        an update is in parts and its trainer died between parts, the weights stay a mix for good, so refuse to
        serve them (and abort what runs) instead of generating from them."""
        outputs = self._poll_join()
        return outputs + self._watch_trainer()

    def _watch_trainer(self) -> list:
        now = time.monotonic()
        if not self.partial_parts or self.s.unusable is not None or now < self._next_watch:
            return []
        self._next_watch = now + WATCH_EVERY_S
        dead = self.updater.dead_groups()
        if not dead:
            return []
        outputs: list = []
        self._set_unusable(f"The trainer of weight-update group {dead[0]!r} is gone after {self.partial_parts} "
                           "parts of an update were applied: the weights are a mix of old and new; generation is "
                           "refused until the next successful update.", outputs)
        return outputs

    # --- dispatch -------------------------------------------------------------------------------

    def handle(self, msg: Any) -> list:
        if self._join is not None:  # in order: after the join's answer
            self._held.append(msg)
            return []
        handler = self._handlers[type(msg)]
        outputs: list = []
        try:
            result = handler(msg, outputs)
        except Exception as e:  # our bug: answer it (the caller must never wait forever), keep serving
            logger.exception("Control message %s failed", type(msg).__name__)
            result = self._result(msg, False, f"{type(msg).__name__} failed on a bug in the engine (its log has the "
                                              f"traceback): {type(e).__name__}: {e}")
        if result is not None:  # None: a join started; answered by poll()
            outputs.append(result)
        return outputs

    def _poll_join(self) -> list:
        if self._join is None or not self._join.done:
            return []
        join, self._join = self._join, None
        outputs: list = [self._join_result(join)]
        while self._held and self._join is None:
            outputs += self.handle(self._held.popleft())
        return outputs

    def _result(self, msg: Any, success: bool, message: str, **extra: Any) -> ControlResult:
        return ControlResult(id=msg.id, success=success, message=message, weight_version=self.s.weight_version,
                             unusable=self.s.unusable, paused=self.s.paused is not None, **extra)

    # --- updates --------------------------------------------------------------------------------

    def _update(self, msg: Any, outputs: list, apply: Any, ok: str, fail_prefix: str,
                complete: bool) -> ControlResult:
        try:
            return self._apply_update(msg, outputs, apply, ok, fail_prefix, complete)
        finally:
            release_free_heap()  # the update's buffers are gone: give their pages back (runtime/heap_trim.py)

    def _apply_update(self, msg: Any, outputs: list, apply: Any, ok: str, fail_prefix: str,
                      complete: bool) -> ControlResult:
        """Run `apply()` (returns an UpdateReport); on success bump the version and invalidate old KV.

        `complete`: the request is a whole update by itself (disk) or names the version it completes."""
        start = time.perf_counter()
        try:
            report: UpdateReport = apply()
        except (WeightUpdateError, BroadcastError, PartialUpdateError, RuntimeError, ValueError) as e:
            mixed = isinstance(e, PartialUpdateError) or (not isinstance(e, WeightUpdateError)
                                                          and self.partial_parts > 0)
            message = self._failure_message(fail_prefix, e, mixed)
            if mixed:
                self._set_unusable(message, outputs)
            logger.error("%s", message)
            return self._result(msg, False, message)
        self.s.invalidate_kv()
        if getattr(msg, "weight_version", None) is not None:
            self.s.weight_version = msg.weight_version
        self.partial_parts = 0 if complete or getattr(msg, "weight_version", None) is not None else \
            self.partial_parts + 1
        self.s.unusable = None
        self.num_updates += 1
        self.update_seconds += time.perf_counter() - start
        return self._result(msg, True, ok, report={"num_tensors": len(report.names), "num_bytes": report.num_bytes,
                                                   "seconds": time.perf_counter() - start})

    @staticmethod
    def _failure_message(prefix: str, e: Exception, mixed: bool) -> str:
        if isinstance(e, CheckpointNotFoundError):
            return str(e)  # API.md's "Failed to get weights iterator: {path} (repository not found)."
        text = str(e).rstrip(".")
        if isinstance(e, PartialUpdateError):  # the error says what was written (a file, a direct receive)
            return (f"{prefix}{text}. The weights are now a mix of old and new; generation is refused until the "
                    "next successful update.")
        if mixed:
            return (f"{prefix}{text}. The weights are now a mix of old and new (earlier parts of this update were "
                    "applied); generation is refused until the next successful update.")
        return f"{prefix}{text}.\nRolling back to original weights."

    def _set_unusable(self, message: str, outputs: list) -> None:
        self.s.unusable = message
        # The state first: the front end then answers the aborted requests (and new ones) 503.
        outputs.append(EngineState(weight_version=self.s.weight_version, unusable=message,
                                   paused=self.s.paused is not None))
        outputs += self.s.abort("", abort_all=True, message=message, status_code=503)

    def _update_from_disk(self, msg: UpdateWeightsFromDiskReq, outputs: list) -> ControlResult:
        if msg.abort_all_requests:
            outputs += self.s.abort("", abort_all=True, message="Aborted: the weights are being updated.")
        return self._update(msg, outputs, lambda: self.updater.from_disk(msg.model_path, msg.load_format, msg.digests),
                            "Succeeded to update model weights.", "Failed to update weights: ", complete=True)

    def _update_from_distributed(self, msg: UpdateWeightsFromDistributedReq, outputs: list) -> ControlResult:
        return self._update(msg, outputs, lambda: self.updater.from_distributed(msg),
                            "Succeeded to update parameter online.", "Failed to update parameter online: ",
                            complete=False)

    def _update_from_tensor(self, msg: UpdateWeightsFromTensorReq, outputs: list) -> ControlResult:
        return self._update(msg, outputs,
                            lambda: self.updater.from_serialized(msg.serialized_named_tensors, msg.load_format,
                                                                 msg.digests),
                            "Succeeded to update model weights.", "Failed to update weights: ", complete=False)

    def _update_from_local_tensors(self, msg: UpdateWeightsFromLocalTensorsReq, outputs: list) -> ControlResult:
        return self._update(msg, outputs, lambda: self.updater.from_named_tensors(msg.named_tensors, msg.digests),
                            "Succeeded to update model weights.", "Failed to update weights: ", complete=False)

    def _update_weight_version(self, msg: UpdateWeightVersionReq, outputs: list) -> ControlResult:
        if msg.abort_all_requests:
            outputs += self.s.abort("", abort_all=True, message="Aborted: the weight version changed.")
        self.s.weight_version = msg.new_version
        self.partial_parts = 0
        return self._result(msg, True, f"Weight version updated to {msg.new_version}.")

    # --- groups and reads -----------------------------------------------------------------------

    def _init_group(self, msg: InitWeightsUpdateGroupReq, outputs: list) -> ControlResult | None:
        try:
            self.updater.check_join(msg)
        except Exception as e:
            return self._result(msg, False, f"Failed to initialize custom process group: {e}.")
        self._join = GroupJoin(msg, self.updater)
        return None

    def _join_result(self, join: GroupJoin) -> ControlResult:
        msg = join.msg
        try:
            if join.error is not None:
                raise join.error
            where = self.updater.add_group(msg.group_name, join.group)
        except Exception as e:  # GroupJoinError names the address, rank and timeout
            return self._result(msg, False, f"Failed to initialize custom process group: {str(e).rstrip('.')}.")
        logger.info("Joined weight-update group %r (%s).", msg.group_name, where)
        return self._result(msg, True, "Succeeded to initialize custom process group.")

    def _destroy_group(self, msg: DestroyWeightsUpdateGroupReq, outputs: list) -> ControlResult:
        try:
            self.updater.destroy_group(msg.group_name)
        except Exception as e:
            return self._result(msg, False, f"Failed to destroy custom process group: {e}")
        return self._result(msg, True, "Succeeded to destroy custom process group.")

    def _get_weights(self, msg: GetWeightsByNameReq, outputs: list) -> ControlResult:
        try:
            values = self.updater.get_weights(msg.name, msg.truncate_size)
        except WeightUpdateError as e:
            return self._result(msg, False, str(e))
        return self._result(msg, True, "", parameter=values)

    # --- pause ----------------------------------------------------------------------------------

    def _pause(self, msg: PauseGenerationReq, outputs: list) -> ControlResult:
        if msg.mode not in PAUSE_MODES:
            return self._result(msg, False, f"mode must be one of {list(PAUSE_MODES)}, got {msg.mode!r}.")
        if msg.mode == "abort":
            outputs += self.s.abort("", abort_all=True, message="Aborted by pause_generation.")
        elif msg.mode == "retract":
            self.s.retract_all()
        self.s.paused = msg.mode
        return self._result(msg, True, f"Generation paused ({msg.mode}).")

    def _continue(self, msg: ContinueGenerationReq, outputs: list) -> ControlResult:
        self.s.paused = None
        return self._result(msg, True, "Generation continued.")

    # --- memory ---------------------------------------------------------------------------------

    def _tags(self, tags: list[str] | None) -> list[str]:
        tags = list(MEMORY_TAGS) if tags is None else tags
        bad = [t for t in tags if t not in MEMORY_TAGS]
        if bad:
            raise ValueError(f"Unknown memory tags {bad}; known: {list(MEMORY_TAGS)}.")
        return tags

    def _release_memory(self, msg: ReleaseMemoryReq, outputs: list) -> ControlResult:
        try:
            tags = self._tags(msg.tags)
        except ValueError as e:
            return self._result(msg, False, str(e))
        if self.s.running:
            return self._result(msg, False, f"Cannot release memory while {len(self.s.running)} requests hold KV "
                                            "cache; pause_generation with mode 'abort' or 'retract' first.")
        if "kv_cache" in tags and not self.kv_released:
            self.kv_released = self.s.release_kv_memory()
        if "weights" in tags:
            self.updater.release()
        self.s.memory_released = self.kv_released or self.updater.released
        if self.s.memory_released:
            self.s.runner.memory_released()
        return self._result(msg, True, f"Released {tags}.")

    def _resume_memory(self, msg: ResumeMemoryReq, outputs: list) -> ControlResult:
        try:
            tags = self._tags(msg.tags)
        except ValueError as e:
            return self._result(msg, False, str(e))
        message = f"Resumed {tags}."
        if "kv_cache" in tags and self.kv_released:
            self.s.resume_kv_memory()
            self.kv_released = False
        if "weights" in tags and self.updater.released and not self.updater.resume():
            message += " The weights' values were dropped (CPU): push an update before generating."
            self.s.unusable = ("The weights were released and resumed without their values; update the weights "
                               "before generating.")
        self.s.memory_released = self.kv_released or self.updater.released
        if not self.s.memory_released:
            self.s.runner.memory_resumed()
        return self._result(msg, True, message)

