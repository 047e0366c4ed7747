#!/usr/bin/env bash
# The test command: sets up the environment itself, then runs the whole suite.
# Extra arguments go to pytest (e.g. -k loop, -m "not multiproc").
set -euo pipefail
cd "$(dirname "$0")/.."
bash launcher/setup.sh
# shellcheck disable=SC1091
. "${ALBOR_VENV:-.venv}/bin/activate"
# Without a GPU, tell DeepSpeed so instead of letting it probe and warn on every import.
if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
exec python -m pytest -q "$@"
