#!/usr/bin/env bash
# Trains albor on this machine's GPUs, one rank each, under DeepSpeed's launcher:
#   bash launcher/single_node.sh --dataset data/my_corpus --mode from-scratch --output-dir runs/370m-001 ...
# runs `deepspeed --num_gpus N --module albor.pretrain ARGS`, ARGS as albor.pretrain takes them (README),
# paths relative to where you run it. Run launcher/setup.sh once first. Exits with the run's code
# (README "Exit codes"). To stop it cleanly, send SIGTERM to the ranks, or to this script (which becomes
# the deepspeed runner): the ranks notice their runner is gone, save and exit 15; the runner's own
# code is then 143.
#
# Environment:
#   ALBOR_NUM_GPUS     ranks to start (default: the GPUs nvidia-smi lists). Without a GPU it must be set,
#                      and starts that many CPU ranks (gloo), as the tests do.
#   ALBOR_MASTER_PORT  the ranks' rendezvous port (default: DeepSpeed's, 29500); give a second run on
#                      the same machine another one.
#   ALBOR_VENV         virtualenv to activate (default: .venv in the repository, when it exists)
#   DS_ACCELERATOR     set to cpu here when no GPU is found, unless already set
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv="${ALBOR_VENV:-$repo/.venv}"
# shellcheck disable=SC1091
[ ! -f "$venv/bin/activate" ] || . "$venv/bin/activate"

gpus=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L | grep -c '^GPU ')
fi
if [ "$gpus" -eq 0 ]; then
  # Without this DeepSpeed probes for a GPU and warns at every import.
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
  if [ -z "${ALBOR_NUM_GPUS:-}" ]; then
    echo "single_node.sh: no NVIDIA GPU found: set ALBOR_NUM_GPUS=N for N CPU ranks, or use launcher/dev.sh" >&2
    exit 2
  fi
fi
ranks="${ALBOR_NUM_GPUS:-$gpus}"

port_args=()
[ -z "${ALBOR_MASTER_PORT:-}" ] || port_args=(--master_port "$ALBOR_MASTER_PORT")
exec deepspeed --num_gpus "$ranks" "${port_args[@]}" --module albor.pretrain "$@"
