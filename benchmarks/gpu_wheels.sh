#!/usr/bin/env bash
# Download, here (where PyPI is reachable), the wheels the device check needs on a GPU machine that has
# no package registry: Python 3.12 on x86-64 Linux, with torch, triton, transformers, numpy, requests,
# pytest and pytest-timeout already installed there (the packages below are what it lacks). Pinned to the
# versions our tests pass with. Their dependencies come too; pip installs only the missing ones there.
#
#   bash benchmarks/gpu_wheels.sh            # fills .gpu_wheels/ (git-ignored; about 30 MB)
#   then carry .gpu_wheels to the GPU machine and run benchmarks/gpu_check.sh there (README, "GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.gpu_wheels
mkdir -p "$DEST"
python3 -m pip download --dest "$DEST" --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any \
    msgspec==0.23.0 gguf==0.19.0 fastapi==0.165.0 uvicorn==0.54.0 pyzmq==27.3.0 safetensors==0.8.0
ls -1 "$DEST" | wc -l
du -sh "$DEST"
