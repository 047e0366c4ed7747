#!/usr/bin/env bash
# The prepared GPU check: run it once on a machine with an NVIDIA GPU and record what it prints.
# 1) the GPU-marked tests (incl. the bf16 .apr == zero_to_fp32 check); 2) albor-370M forward+backward vs transformers on the GPU (ratio);
# 3) a short real single-GPU run of albor-370M on the built-in corpus (tokens/s, MFU, util per step).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launcher/lib.sh
. launcher/lib.sh
albor_activate_venv
nvidia-smi -L
python -m pytest -q -m gpu tests/test_gpu.py tests/test_dist_checkpoint.py
python benchmarks/bench_model.py --preset albor-370m --device cuda --batch 8 --seq 1024 --iters 10
DATA=$(mktemp -d)/stdlib
albor prepare-data --builtin python-stdlib --output "$DATA"
python -m albor.pretrain --dataset "$DATA" --model albor-370m --output-dir "$(mktemp -d)/run" \
  --mode from-scratch --total-steps 30 --steps-per-epoch 30 --batch-size 8 --seq-length 1024 --warmup-steps 5 \
  || echo "(exit $? is expected: 30 steps cannot meet the target)"
