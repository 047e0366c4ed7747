#!/usr/bin/env bash
# Trains albor on this machine's GPUs, one rank each, under DeepSpeed's launcher:
#   bash launcher/single_node.sh --dataset data/my_corpus --mode from-scratch --output-dir runs/370m-001 ...
# runs `deepspeed [--num_gpus N] --module albor.pretrain ARGS`, ARGS as albor.pretrain takes them (README),
# paths relative to where you run it. Run launcher/setup.sh once first. Exits with the run's code
# (README "Exit codes"). To stop it cleanly, send SIGTERM to the ranks, or to this script (which becomes
# the deepspeed runner): the ranks notice their runner is gone, save and exit 15; the runner's own
# code is then 143.
#
# Environment:
#   CUDA_VISIBLE_DEVICES  the GPUs to train on, one rank each (default: every GPU); DeepSpeed reads it
#                      when ALBOR_NUM_GPUS is unset, and ignores it when it is set
#   ALBOR_NUM_GPUS     ranks to start, passed as --num_gpus: the first N GPUs (default: let DeepSpeed count
#                      them, CUDA_VISIBLE_DEVICES honoured). Without a GPU it must be set, and starts that
#                      many CPU ranks (gloo), as the tests do.
#   ALBOR_MASTER_PORT  the ranks' rendezvous port (default: DeepSpeed's, 29500); give a second run on
#                      the same machine another one.
#   ALBOR_VENV         virtualenv to activate, relative to the repository (default: its .venv, when it
#                      exists; one named here must exist)
#   DS_ACCELERATOR     set to cpu here when no GPU is found, unless already set
set -euo pipefail
# shellcheck source=launcher/lib.sh
. "$(dirname "$0")/lib.sh"
albor_activate_venv

if ! albor_has_gpu; then
  # Without this the deepspeed runner probes for a GPU and warns at its import.
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
  if [ -z "${ALBOR_NUM_GPUS:-}" ]; then
    echo "single_node.sh: no NVIDIA GPU found: set ALBOR_NUM_GPUS=N for N CPU ranks, or use launcher/dev.sh" >&2
    exit 2
  fi
fi

# --num_gpus only when asked for: given it, DeepSpeed ignores CUDA_VISIBLE_DEVICES.
args=()
[ -z "${ALBOR_NUM_GPUS:-}" ] || args+=(--num_gpus "$ALBOR_NUM_GPUS")
[ -z "${ALBOR_MASTER_PORT:-}" ] || args+=(--master_port "$ALBOR_MASTER_PORT")
exec deepspeed "${args[@]}" --module albor.pretrain "$@"
