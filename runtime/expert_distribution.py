"""The expert distribution record (SGLang's /start_, /stop_, /dump_expert_distribution_record): how often
each MoE layer routed tokens to each expert, while recording is on.

Modes (`--expert-distribution-recorder-mode`):
- `stat`: counts per layer and expert, summed over every recorded forward pass;
- `per_pass`: those counts for each forward pass, the newest `--expert-distribution-recorder-buffer-size`
  passes (-1: all);
- `per_token`: the top-k expert ids of every recorded token, the newest buffer-size tokens (-1: all).
Every mode also keeps the summed counts. A dump writes a safetensors file (no pickle) and a CSV
(`layer_id,expert_id,count`, the summed counts) into `--expert-distribution-dir` (else the directory in
SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR, else the system's temp directory), answers their paths and a
summary (tokens and passes recorded, per-layer load imbalance: max count / mean count over the layer's
experts), and starts a fresh record. The record lives on the model's device; nothing syncs per step.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from runtime.models.moe_layout import MoeLayout
from runtime.routing_capture import RoutingCapture

RECORDER_MODES = ("stat", "per_pass", "per_token")
DIR_ENV = "SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR"
ACTIONS = ("start", "stop", "dump")


class ExpertDistributionRecorder:
    def __init__(self, layout: MoeLayout, mode: str, buffer_size: int, out_dir: str | None,
                 device: torch.device | str):
        if mode not in RECORDER_MODES:
            raise ValueError(f"expert_distribution_recorder_mode must be one of {list(RECORDER_MODES)}, got {mode!r}.")
        self.layout = layout
        self.mode = mode
        self.buffer_size = buffer_size
        self.out_dir = out_dir or os.environ.get(DIR_ENV) or tempfile.gettempdir()
        self.device = torch.device(device)
        self.recording = False
        self._reset()

    def _reset(self) -> None:
        maxlen = None if self.buffer_size < 0 else self.buffer_size
        self.counts = torch.zeros(self.layout.num_layers, self.layout.num_experts, dtype=torch.int64,
                                  device=self.device)
        self.num_tokens = 0
        self.num_passes = 0
        self._passes: deque[torch.Tensor] = deque(maxlen=maxlen)     # per_pass: [layers, experts] each
        self._tokens: deque[torch.Tensor] = deque()                   # per_token: [T, layers, k] each
        self._buffered_tokens = 0

    # --- control --------------------------------------------------------------------------------

    def handle(self, action: str) -> tuple[str, dict[str, Any] | None]:
        """Apply start / stop / dump; (message, report: a dump's paths and summary)."""
        if action == "start":
            self._reset()
            self.recording = True
            return f"Expert distribution recording started ({self.mode}).", None
        if action == "stop":
            self.recording = False
            return "Expert distribution recording stopped.", None
        if action == "dump":
            report = self.dump()
            return f"Expert distribution record dumped to {report['path']}.", report
        raise ValueError(f"action must be one of {list(ACTIONS)}, got {action!r}.")

    # --- one step -------------------------------------------------------------------------------

    def record(self, capture: RoutingCapture | None) -> None:
        if not self.recording or capture is None or not capture.layer_ids:
            return
        ids = capture.stacked()  # [T, layers, k]
        num_layers, num_experts = self.layout.num_layers, self.layout.num_experts
        flat = (ids + torch.arange(num_layers, device=ids.device)[None, :, None] * num_experts).reshape(-1)
        # index_add, not bincount: bincount sizes its output from the data, a host sync on a GPU.
        step = torch.zeros(num_layers * num_experts, dtype=torch.int64, device=ids.device)
        step = step.index_add_(0, flat, torch.ones_like(flat)).view(num_layers, num_experts)
        self.counts += step
        self.num_tokens += ids.shape[0]
        self.num_passes += 1
        if self.mode == "per_pass":
            self._passes.append(step.to(torch.int32))
        elif self.mode == "per_token":
            self._tokens.append(ids.to(torch.int16))
            self._buffered_tokens += ids.shape[0]
            while 0 <= self.buffer_size < self._buffered_tokens:  # keep the newest buffer_size tokens
                extra = self._buffered_tokens - self.buffer_size
                first = self._tokens[0]
                if first.shape[0] <= extra:
                    self._tokens.popleft()
                    self._buffered_tokens -= first.shape[0]
                else:
                    self._tokens[0] = first[extra:]
                    self._buffered_tokens -= extra

    # --- dump -----------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        counts = self.counts.double().cpu()
        mean = counts.mean(dim=1)
        imbalance = [None if m == 0 else float(mx / m) for mx, m in zip(counts.max(dim=1).values, mean)]
        known = [x for x in imbalance if x is not None]
        return {
            "mode": self.mode, "recording": self.recording, "num_tokens": self.num_tokens,
            "num_forward_passes": self.num_passes, "layer_ids": list(self.layout.layer_ids),
            "num_experts": self.layout.num_experts, "top_k": self.layout.top_k,
            "load_imbalance": imbalance,  # per MoE layer: max / mean tokens per expert (1.0 = balanced)
            "max_load_imbalance": max(known) if known else None,
            "mean_load_imbalance": sum(known) / len(known) if known else None,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"layer_ids": torch.tensor(self.layout.layer_ids, dtype=torch.int64),
               "counts": self.counts.cpu()}
        if self.mode == "per_pass":
            empty = torch.zeros(0, self.layout.num_layers, self.layout.num_experts, dtype=torch.int32)
            out["per_pass_counts"] = torch.stack(list(self._passes)).cpu() if self._passes else empty
        elif self.mode == "per_token":
            empty = torch.zeros(0, self.layout.num_layers, self.layout.top_k, dtype=torch.int16)
            out["topk_ids"] = torch.cat(list(self._tokens)).cpu() if self._tokens else empty
        return {k: v.contiguous() for k, v in out.items()}

    def csv(self) -> str:
        lines = ["layer_id,expert_id,count"]
        for layer, row in zip(self.layout.layer_ids, self.counts.cpu().tolist()):
            lines += [f"{layer},{e},{c}" for e, c in enumerate(row)]
        return "\n".join(lines) + "\n"

    def dump(self) -> dict[str, Any]:
        """Write the record (safetensors + CSV), answer where and its summary, and start afresh."""
        directory = Path(self.out_dir)
        directory.mkdir(parents=True, exist_ok=True)
        stem = f"expert_distribution_{self.mode}_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}_{time.monotonic_ns()}"
        path, csv_path = directory / f"{stem}.safetensors", directory / f"{stem}.csv"
        summary = self.summary()
        save_file(self.tensors(), str(path), metadata={"mode": self.mode, "num_tokens": str(self.num_tokens),
                                                       "num_forward_passes": str(self.num_passes)})
        csv_path.write_text(self.csv())
        recording = self.recording
        self._reset()
        self.recording = recording
        return {"path": str(path), "csv_path": str(csv_path), "summary": summary}
