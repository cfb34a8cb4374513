#!/usr/bin/env bash
# Create .venv and install genalign with everything the tests and the demo need (CPU, offline-capable).
# Re-running is cheap: it reinstalls only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.genalign-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # The torch pin goes on the same line as the project (ENVIRONMENT.md): a separate install resolves other builds.
  .venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1 -e '.[dev,ui,video,datasets]'
  echo "$want" > "$stamp"
fi
