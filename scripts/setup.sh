#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and install memfit into it.
# Usage: scripts/setup.sh [EXTRAS]   (default extras: all,dev)
# Idempotent: a stamp file records what was installed; nothing is reinstalled unless pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-all,dev}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[memfit] creating .venv with $($py --version)"
  "$py" -m venv .venv
fi
stamp=".venv/.memfit-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[memfit] installing memfit[$extras] into .venv (first time: about 2 minutes, torch is large)"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e ".[$extras]"
  # An editable install compiles nothing; compile memfit's modules now, as a regular install would, so that a
  # first import does not parse sources (and grow the process) in the middle of a measured run.
  .venv/bin/python -m compileall -q memfit >/dev/null || true
  echo "$want" > "$stamp"
fi
