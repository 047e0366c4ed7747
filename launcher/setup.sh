#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs albor into it.
# Where no NVIDIA GPU is present it installs PyTorch's CPU build first, so that
# the plain torch requirement does not pull a CUDA build of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launcher/lib.sh
. launcher/lib.sh
VENV=$(albor_venv_path)
PY="${PYTHON:-python3}"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
albor_activate_venv

# The tested torch and DeepSpeed ranges, as pyproject.toml pins them (one source).
pinned() { grep -o "\"$1[<>=][^\"]*\"" pyproject.toml | tr -d '"'; }
TORCH_SPEC=$(pinned torch)
DEEPSPEED_SPEC=$(pinned deepspeed)

if ! python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)"; then
  if albor_has_gpu; then
    python -m pip install -q "$TORCH_SPEC"
  else
    python -m pip install -q "torch==2.13.0"  # in that range: the CPU build on this project's machines
  fi
fi
# DeepSpeed builds from source: without build isolation it compiles against the
# torch above instead of downloading a second (CUDA) torch into a build env.
if ! python -c "import importlib.util as u, sys; sys.exit(u.find_spec('deepspeed') is None)"; then
  python -m pip install -q setuptools wheel
  python -m pip install -q --no-build-isolation "$DEEPSPEED_SPEC"
fi
# Reinstall albor (editable) only when its declared dependencies changed.
stamp="$VENV/.albor-pyproject.sha256"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! python -c "import albor" 2>/dev/null; then
  python -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
fi
