#!/usr/bin/env bash
# Dev mode: trains albor as one process, no launcher, on the GPU if there is one, else on the CPU:
#   bash launcher/dev.sh --dataset data/python-stdlib --model tiny --output-dir runs/dev-001 ...
# runs `python -m albor.pretrain ARGS` (README for ARGS; paths relative to where you run it). The same
# contract and files as a multi-rank run, with one rank. SIGTERM or SIGUSR1 (kill -TERM PID) saves a
# checkpoint and exits 15; Ctrl-C (SIGINT) is not a stop request. Run launcher/setup.sh once first.
#
# Environment:
#   ALBOR_VENV            virtualenv to activate, relative to the repository (default: its .venv, when
#                         it exists; one named here must exist)
#   CUDA_VISIBLE_DEVICES  which GPU: the first one it lists is used
# (No DS_ACCELERATOR here: albor sets it to cpu itself, before it imports DeepSpeed, when torch sees no
# GPU; albor/distributed/compat.py.)
set -euo pipefail
# shellcheck source=launcher/lib.sh
. "$(dirname "$0")/lib.sh"
albor_activate_venv
exec python -m albor.pretrain "$@"
