#!/usr/bin/env bash
# The prepared GPU check (docs/gpu-check.md): run it once on a machine with an NVIDIA GPU and keep what it prints.
# One table in at most 8 minutes on one H200: albor-370m, bf16, 16 x 1024 (median step over steps 20-49, tokens/s,
# MFU, peak memory, NVML utilisation per rank) with every lever on, then each one off, and a bare DeepSpeed loop on
# the same engine; then a rerun compared bit for bit, a NaN drill under NCCL (exit 12, status.json), the .apr of
# the bf16 run against zero_to_fp32, and the GPU-marked tests. The table and a JSON report also go to $OUT (or
# --out DIR, else runs/gpu-check). Exit 0: every check passed; 1: a check failed or did not run, or a run broke;
# 2: no GPU here. Extra arguments go to benchmarks/gpu_check.py (e.g. --budget-s 600, --only baseline,bitwise).
#   bash launcher/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launcher/lib.sh
. launcher/lib.sh
albor_activate_venv
if ! albor_has_gpu; then
  echo "gpu_check.sh: no NVIDIA GPU here (nvidia-smi -L lists none); its CPU form:" \
    "python benchmarks/gpu_check.py --cpu-smoke" >&2
  exit 2
fi
nvidia-smi -L
exec python benchmarks/gpu_check.py "$@"
