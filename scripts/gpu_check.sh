#!/usr/bin/env bash
# The checks only a CUDA GPU can make, in one run of under 8 minutes; results go into benchmarks/RESULTS.md
# with the card's name.
#   1. PyTorch CUDA FP16 against FP32 for the nano vision model on one window: per-prompt Dice agreement of the
#      masks, logit error, time and peak memory (benchmarks/gpu_fp16.py).
#
# Usage:
#   scripts/gpu_check.sh --fetch-wheels   # on a machine with the package index: the pure-Python packages a
#                                         # torch-only GPU image lacks, into .whl/ (git-ignored)
#   scripts/gpu_check.sh                  # on the GPU host, from the repository root: installs .whl/ (if any)
#                                         # into a temporary folder and runs the checks; a copy of the output
#                                         # goes to $OUT/gpu_check.txt when $OUT is set
#   scripts/gpu_check.sh --dry-run        # the same run on this CPU with the tiny model (the test suite runs
#                                         # it), so no GPU minute is spent finding a broken script
# The GPU host needs python3 with CUDA PyTorch, numpy, scipy, safetensors and transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(monai==1.6.1 nibabel==5.4.2 pydicom==3.0.2)

if [ "${1:-}" = "--fetch-wheels" ]; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl "${WHEELS[@]}"
    ls -l .whl
    exit 0
fi

if compgen -G ".whl/*.whl" > /dev/null; then
    site=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
    export PYTHONPATH="$site"
fi
CHECK_ARGS=(--size nano --prompts 8 --repeats 10)
if [ "${1:-}" = "--dry-run" ]; then
    CHECK_ARGS=(--device cpu --size tiny --prompts 2 --repeats 1 --warmups 0)
fi
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
report=${OUT:-$(mktemp -d)}/gpu_check.txt
mkdir -p "$(dirname "$report")"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    timeout 420 "$PYTHON" benchmarks/gpu_fp16.py "${CHECK_ARGS[@]}"
} 2>&1 | tee "$report"
