#!/usr/bin/env bash
# The test command: set up .venv if needed, then run the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The demo's browser test drives Debian's chromium + chromedriver (about 20 s to install): installed here when
# this runs as root with apt-get; otherwise that one test is skipped and says why.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } >/dev/null \
    || echo "scripts/test.sh: could not install chromium; the demo's browser test will be skipped" >&2
fi
source scripts/offline-env.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
