#!/usr/bin/env bash
# The test command: sets up the environment itself, then runs the whole suite.
# Extra arguments go to pytest (e.g. -k loop, -m "not multiproc").
set -euo pipefail
cd "$(dirname "$0")/.."
bash launcher/setup.sh
# shellcheck disable=SC1091
. "${ALBOR_VENV:-.venv}/bin/activate"
exec python -m pytest -q "$@"
