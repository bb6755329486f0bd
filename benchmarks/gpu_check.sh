#!/usr/bin/env bash
# The device check on a GPU machine without a package registry (README, "GPU"): install the carried wheels
# (benchmarks/gpu_wheels.sh made .gpu_wheels/ beforehand), then run benchmarks/gpu_check.py, which prints
# one summary table and writes JSON (to $OUT when the device tool provides it).
#
#   bash benchmarks/gpu_check.sh                       # everything, about 6-8 minutes on one H100/H200
#   bash benchmarks/gpu_check.sh --parts tests,parity  # a subset
#   bash benchmarks/gpu_check.sh --device cpu --tiny   # the driver on a CPU (no wheels needed here)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .gpu_wheels ]; then
    # Only what is missing is installed; the machine's torch, triton and transformers stay as they are.
    python3 -m pip install --quiet --no-index --find-links .gpu_wheels msgspec gguf fastapi uvicorn pyzmq safetensors
fi
python3 - <<'PY'
import importlib.util, sys
missing = [m for m in ("msgspec", "gguf", "fastapi", "uvicorn", "zmq", "safetensors", "transformers", "triton")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {missing}; run benchmarks/gpu_wheels.sh where PyPI is reachable and "
             "carry .gpu_wheels/")
PY
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "${OUT:-.}"
exec python3 -m benchmarks.gpu_check --out "${OUT:-.}/gpu_check.json" "$@"
