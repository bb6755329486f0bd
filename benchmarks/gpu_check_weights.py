"""Weight updates in the device check (benchmarks/gpu_check.py), each beside its raw bound:

- tensor: Engine.update_weights_from_tensor of every weight (a trainer's tensors on the same device, in
  the engine's dtype) vs one device copy of the same bytes (flat source into flat destination);
- broadcast: a trainer process pushes every weight in buckets on a group whose backend follows the
  device (NCCL on CUDA, gloo on CPU; the same code path), vs one raw broadcast of the same bytes. It runs
  `python -m benchmarks.weight_update` in a child process with a timeout, so a backend that fails (NCCL
  refuses two ranks on one GPU) is reported, not fatal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import torch

from benchmarks.gpu_check_generation import engine, free


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def tensor_update(path: str, device: str, dtype: str, repeats: int = 3) -> dict[str, Any]:
    eng = engine(path, device, dtype, max_total_tokens=4096, context_length=256)
    try:
        model = eng.runner.model
        names = [n for n in model.hf_weight_names() if model.weight_target(n) is not None]
        gen = torch.Generator().manual_seed(5)
        named = []
        for n in names:
            target = model.weight_target(n)
            noise = torch.randn(target.shape, generator=gen).to(target.device, target.dtype) * 0.01
            named.append((n, target.detach().clone() + noise))
        nbytes = sum(t.numel() * t.element_size() for _, t in named)
        src = torch.cat([t.reshape(-1).view(torch.uint8) for _, t in named])
        dst = torch.empty_like(src)
        ours, raw = [], []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            ok, msg = eng.update_weights_from_tensor(named)
            _sync(device)
            ours.append(time.perf_counter() - t0)
            assert ok, msg
            t0 = time.perf_counter()
            dst.copy_(src)
            _sync(device)
            raw.append(time.perf_counter() - t0)
        name = names[-1]
        got = torch.tensor(eng.get_weights_by_name(name, truncate_size=2))
        want = dict(named)[name][:2].float().cpu()
        return {"bytes": nbytes, "update_s": min(ours), "raw_copy_s": min(raw), "ratio": min(ours) / min(raw),
                "landed": bool(torch.equal(got.float(), want))}
    finally:
        free(eng)


def broadcast_update(path: str, device: str, dtype: str, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.weight_update", "--model-path", path, "--device", device,
           "--dtype", dtype, "--repeats", "2", "--json", "--skip", "disk,unflat,control"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    except subprocess.TimeoutExpired as e:
        return {"ok": False, "error": f"timed out after {timeout:g} s", "stderr_tail": str(e.stderr or "")[-1500:]}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"ok": False, "error": f"exit {done.returncode}", "stderr_tail": done.stderr[-1500:]}
    result = json.loads(lines[-1])
    return {"ok": True, "backend": result["backend"], "bytes": result["bytes"], "update_s": result["broadcast_s"],
            "raw_broadcast_s": result["broadcast_raw_s"], "ratio": result["broadcast_ratio"]}
