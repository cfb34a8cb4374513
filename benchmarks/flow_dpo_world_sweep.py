"""The Flow-DPO settings sweep on the built-in world reported in the README ("Flow-DPO on the world").

    python benchmarks/flow_dpo_world_sweep.py pairs --num-prompts 2048 --seed 1 --out runs/sweep/pairs
    python benchmarks/flow_dpo_world_sweep.py relabel --ta-weight 0.75 --pairs runs/sweep/pairs/pairs.parquet --out runs/sweep/pairs-ta
    python benchmarks/flow_dpo_world_sweep.py train NAME runs/sweep/pairs/pairs.parquet beta=100 lr=3e-4 [key=value ...]

`train` evaluates base (cached) and aligned models on 64 held-out prompts x 4 samples with the same seeds and
prints aligned minus base with 95% intervals over prompts. key=value are FlowDPOConfig keys.

The online rows of the README (best vs worst of 8 from the current model) come from the shipped recipe:

    genalign train flow-dpo --config flow_dpo_world_online output_dir=runs/online            # round 0 (shipped)
    genalign train flow-dpo --config flow_dpo_world_online output_dir=runs/online2 online_rounds=2 max_steps=600
    genalign train flow-dpo --config flow_dpo_world_online output_dir=runs/online-bt online_prompts=null \
        data=runs/online/round-0/pairs/pairs.parquet reference=adapter beta_schedule=one_minus_t_sq
    python benchmarks/flow_dpo_world_sweep.py compare runs/online/lora runs/online-bt/lora --num-prompts 192

`compare` evaluates base and each LoRA on N held-out prompts (64 per template at 192) x 4 samples, same seeds.
"""

from __future__ import annotations

import argparse
import pickle
import random
import shutil
import time
from pathlib import Path

from genalign.config import from_dict
from genalign.data import load_preference_pairs
from genalign.eval.oracle_eval import compare, generate, judge_samples, summarize
from genalign.models import load_adapter
from genalign.trainers import FlowDPOConfig, FlowDPOTrainer
from genalign.world import resolve_model
from genalign.world.annotators import Annotator, make_preference_data, write_pickapic_parquet
from genalign.world.grammar import heldout_eval_prompts, image_splits

SAMPLING = {"num_steps": 20, "guidance_scale": 4.0, "height": 32, "width": 32}


def make_pairs(args) -> None:
    path, kw, _ = resolve_model("world")
    adapter = load_adapter(path, **kw)
    rng = random.Random(args.seed)
    prompts = [rng.choice(image_splits().train) for _ in range(args.num_prompts)]
    out = make_preference_data(adapter, "image", prompts, args.out, Annotator(noise=0.1, seed=args.seed),
                               seed=args.seed, progress=True, **SAMPLING)
    print(out)


def relabel(args) -> None:
    """Annotators weighing text alignment more: overall = w TA + (1 - w) VQ, same noise and tie margin."""
    import pyarrow.parquet as pq

    rows = pq.read_table(args.pairs).to_pylist()
    annotator = Annotator(noise=0.1, seed=7)
    w = args.ta_weight
    for r in rows:
        a = w * r["oracle_TA_0"] + (1 - w) * r["oracle_VQ_0"]
        b = w * r["oracle_TA_1"] + (1 - w) * r["oracle_VQ_1"]
        r["label_0"] = {"A": 1.0, "B": 0.0, "same": 0.5}[annotator.label(a, b)]
        r["label_1"] = 1.0 - r["label_0"]
    print(write_pickapic_parquet(rows, Path(args.out) / "pairs.parquet"))


def train(args) -> None:
    path, kw, _ = resolve_model("world")
    adapter = load_adapter(path, **kw)
    prompts = heldout_eval_prompts("image", n=64)
    cache = Path(args.base_cache)
    if cache.exists():
        base = pickle.loads(cache.read_bytes())
    else:
        samples, flat = generate(adapter, prompts, 4, seed=1000, progress=False, **SAMPLING)
        base = summarize(judge_samples(samples, flat, progress=False), samples)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_bytes(pickle.dumps(base))
    overrides = dict(item.split("=", 1) for item in args.overrides)
    dataset = load_preference_pairs(args.data, tie_policy=overrides.pop("tie_policy", "drop"))
    cfg = {"output_dir": f"runs/sweep/run-{args.name}", "model": path, "data": args.data, "max_steps": 400, "batch_size": 16,
               "lr": 3e-4, "beta": 500.0, "lora_rank": 16, "seed": 0, "checkpoint_every": 10**6, "log_every": 20, "report_to": "none",
               "warmup_steps": 20, "max_sequence_length": kw.get("max_sequence_length"), "progress_bar": False,
               "num_threads": 1}
    cfg.update(overrides)
    shutil.rmtree(cfg["output_dir"], ignore_errors=True)
    t0 = time.time()
    result = FlowDPOTrainer(adapter, from_dict(FlowDPOConfig, cfg), dataset).train()
    seconds = time.time() - t0
    samples, flat = generate(adapter, prompts, 4, seed=1000, progress=False, **SAMPLING)
    aligned = summarize(judge_samples(samples, flat, progress=False), samples)
    diff = compare(aligned, base)
    print(f"{args.name}: pairs={len(dataset)} train {seconds:.0f}s | TA {base['TA']['mean']:.3f}->"
          f"{aligned['TA']['mean']:.3f} d={diff['TA']['mean']:+.3f} [{diff['TA']['lo']:+.3f},{diff['TA']['hi']:+.3f}] "
          f"VQ d={diff['VQ']['mean']:+.3f} [{diff['VQ']['lo']:+.3f},{diff['VQ']['hi']:+.3f}] "
          f"diversity ratio {diff['diversity_ratio']:.2f} | last implicit_acc {result.last_metrics.get('implicit_acc')}")


def compare_loras(args) -> None:
    from genalign.world import world_model_path
    from genalign.world.aligned_build import evaluate_base_vs_aligned

    def fmt(ci):
        return f"{ci['mean']:+.3f} [{ci['lo']:+.3f}, {ci['hi']:+.3f}]"

    for lora in args.loras:
        r = evaluate_base_vs_aligned(world_model_path("image"), Path(lora), num_prompts=args.num_prompts)
        d = r["aligned_minus_base"]
        print(f"{lora}: TA {r['base_TA']['mean']:.3f} -> {r['aligned_TA']['mean']:.3f}, aligned - base: "
              f"TA {fmt(d['TA'])} VQ {fmt(d['VQ'])} strict {fmt(d['strict'])}, diversity ratio "
              f"{r['diversity_ratio']:.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pairs")
    p.add_argument("--num-prompts", type=int, default=2048)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", required=True)
    p.set_defaults(func=make_pairs)
    p = sub.add_parser("relabel")
    p.add_argument("--pairs", required=True)
    p.add_argument("--ta-weight", type=float, default=0.75)
    p.add_argument("--out", required=True)
    p.set_defaults(func=relabel)
    p = sub.add_parser("train")
    p.add_argument("name")
    p.add_argument("data")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--base-cache", default="runs/sweep/base_eval.pkl")
    p.set_defaults(func=train)
    p = sub.add_parser("compare")
    p.add_argument("loras", nargs="+")
    p.add_argument("--num-prompts", type=int, default=192)
    p.set_defaults(func=compare_loras)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
