#!/usr/bin/env bash
# The main job on the built-in world, end to end (`genalign quickstart`, about 8 minutes on 2 CPU cores): sample
# the base image model, build labelled best-vs-worst pairs, train Flow-DPO, evaluate base vs aligned on held-out
# prompts with the oracle, and write a report folder (report.md, samples.png, curve.png, the LoRA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/offline-env.sh
out=${1:-runs/quickstart}
.venv/bin/genalign quickstart --out "$out"
echo "report in $out/report.md; sample with the shipped aligned LoRA: .venv/bin/genalign demo"
