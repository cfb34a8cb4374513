#!/usr/bin/env bash
# The GPU measurements of issues 3, 4 and 5 in one go (about 10 minutes on one H100 / H200), most wanted first:
# RLG step cost at SD3.5-medium size, the Flow-DPO step at scale, batched reward scoring at real size.
# Each script gets its own time limit so one that hangs cannot eat the others' time; each writes its JSON and
# log to the folder given as $1 (default $OUT, else runs/gpu). Needs genalign and diffusers importable.
set -u
out=${1:-${OUT:-runs/gpu}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
cd "$out"  # not the checkout: its genalign/ would shadow the installed package (rewards/, pipelines/ live outside it)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"

run() {  # run LIMIT_SECONDS NAME ARGS...: one benchmark, its log to $out/NAME.log, its table echoed
    local limit=$1 name=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" python3 "$here/$name.py" "$@" > "$out/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - t0)) s"
    tail -n 24 "$out/$name.log"
}
run 190 rlg_step --gpu --check-offload --out "$out/rlg_step.json"
run 290 flow_dpo_step --device cuda --quick --out "$out/flow_dpo_step_cuda.json"
run 100 reward_throughput --device cuda --quick --out "$out"
