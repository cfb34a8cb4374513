#!/usr/bin/env bash
# The main job on the built-in world: sample the shipped base models and evaluate them with the oracle.
# (Until the trainers land, this is what genalign does end to end on a fresh machine.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/offline-env.sh
out=${1:-runs/world}
.venv/bin/genalign sample --prompt "red circle left of blue square" --prompt "two yellow triangles" \
  --prompt "green cross above magenta circle" --prompt "cyan square" --num-per-prompt 4 --out "$out/image-samples.png"
.venv/bin/genalign eval --kind image --out "$out/eval-image"
.venv/bin/genalign sample --kind video --prompt "red circle moving right" --prompt "blue square moving up" \
  --num-per-prompt 2 --out "$out/video-samples"
.venv/bin/genalign eval --kind video --num-prompts 24 --samples-per-prompt 2 --out "$out/eval-video"
echo "reports in $out/"
