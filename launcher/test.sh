#!/usr/bin/env bash
# The test command: sets up the environment itself, then runs the whole suite.
# Extra arguments go to pytest (e.g. -k loop, -m "not multiproc").
set -euo pipefail
cd "$(dirname "$0")/.."
bash launcher/setup.sh
# shellcheck source=launcher/lib.sh
. launcher/lib.sh
albor_activate_venv
# Without a GPU, tell DeepSpeed so instead of letting it probe and warn on every import.
if ! albor_has_gpu; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
exec python -m pytest -q "$@"
