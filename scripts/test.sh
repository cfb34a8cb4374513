#!/usr/bin/env bash
# The test command: set up .venv if needed, then run the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/offline-env.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
