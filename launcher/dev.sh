#!/usr/bin/env bash
# Dev mode: trains albor as one process, no launcher, on the GPU if there is one, else on the CPU:
#   bash launcher/dev.sh --dataset data/python-stdlib --model tiny --output-dir runs/dev-001 ...
# runs `python -m albor.pretrain ARGS` (README for ARGS; paths relative to where you run it). The same
# contract and files as a multi-rank run, with one rank. SIGTERM or SIGUSR1 (kill -TERM PID) saves a
# checkpoint and exits 15; Ctrl-C (SIGINT) is not a stop request. Run launcher/setup.sh once first.
#
# Environment:
#   ALBOR_VENV            virtualenv to activate (default: .venv in the repository, when it exists)
#   CUDA_VISIBLE_DEVICES  which GPU: the first one it lists is used
#   DS_ACCELERATOR        set to cpu here when no GPU is found, unless already set
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv="${ALBOR_VENV:-$repo/.venv}"
# shellcheck disable=SC1091
[ ! -f "$venv/bin/activate" ] || . "$venv/bin/activate"

if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
  # Without this DeepSpeed probes for a GPU and warns at every import.
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
exec python -m albor.pretrain "$@"
