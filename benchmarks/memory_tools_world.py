"""Tensor memory of a Flow-DPO step on the world's models with each memory tool, side by side.

For each setting (plain; `recompute_attention_inputs`; feed-forward checkpointing; both) the script loads the
world's image model (SD3 design, no qk-norm) or video model (Wan design: q / k RMS-normed across heads, rotary
embeddings), runs one warm-up step of `FlowDPOTrainer` on random pixel pairs (the VAE encodes them in the step, as
without a latent cache) and reports the tensors the training keeps between steps and a step's highest rise above
them, from the allocations torch's CPU allocator reports to the profiler (flow_dpo_step.step_tensor_rise_mb: what
torch.cuda.max_memory_allocated would count on a GPU). Memory, not time: each setting runs once.

    python benchmarks/memory_tools_world.py --kind video            # 16 pairs of 8-frame 32x32 clips
    python benchmarks/memory_tools_world.py --kind image --pairs 16 --out runs/bench/memory_tools_image.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

SETTINGS = {
    "plain": {},
    "recompute_attention_inputs": {"recompute_attention_inputs": True},
    "checkpoint_feedforward": {"gradient_checkpointing": True, "checkpoint_unit": "feedforward"},
    "both": {"gradient_checkpointing": True, "checkpoint_unit": "feedforward", "recompute_attention_inputs": True},
}
PROMPTS = {"image": "a red circle left of a blue square", "video": "a red circle moving right"}


def measure(kind: str, pairs: int, options: dict) -> dict:
    from flow_dpo_step import modules_of, resident_tensor_mb, step_tensor_rise_mb

    from genalign.data import PreferencePair
    from genalign.models import load_adapter
    from genalign.trainers import FlowDPOConfig, FlowDPOTrainer
    from genalign.world import DEFAULT_SAMPLING, world_model_path

    frames = DEFAULT_SAMPLING[kind].get("num_frames")
    rng = np.random.default_rng(0)
    shape = (32, 32, 3) if frames is None else (frames, 32, 32, 3)
    data = [PreferencePair(PROMPTS[kind], rng.integers(0, 256, shape, dtype=np.uint8),
                           rng.integers(0, 256, shape, dtype=np.uint8), 1.0) for _ in range(2 * pairs)]
    adapter = load_adapter(str(world_model_path(kind)))
    cfg = FlowDPOConfig(output_dir=tempfile.mkdtemp(), max_steps=2, batch_size=pairs, report_to="none",
                        progress_bar=False, resolution=32, num_frames=frames, seed=0, **options)
    trainer = FlowDPOTrainer(adapter, cfg, data)
    batches = trainer._batch_stream(0)
    trainer._train_step(batches)  # warm-up: lazily allocated optimizer state and buffers
    return {"resting_mb": resident_tensor_mb(modules_of(adapter.pipe), [trainer.optimizer]),
            "step_rise_mb": step_tensor_rise_mb(lambda: trainer._train_step(batches))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=["image", "video"], default="video")
    parser.add_argument("--pairs", type=int, default=16, help="pairs per step")
    parser.add_argument("--settings", nargs="*", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="JSON report path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {name: measure(args.kind, args.pairs, SETTINGS[name]) for name in args.settings}
    plain = results.get("plain")
    print(f"world {args.kind} model, Flow-DPO, {args.pairs} pairs per step: tensor memory (MB)")
    print(f"{'setting':28s} {'resting':>8s} {'step rise':>10s} {'peak':>8s} {'vs plain':>9s}")
    for name, r in results.items():
        r["peak_mb"] = r["resting_mb"] + r["step_rise_mb"]
        if plain:
            r["peak_ratio"] = r["peak_mb"] / (plain["resting_mb"] + plain["step_rise_mb"])
        ratio = f"{r['peak_ratio']:.2f}x" if plain else "-"
        print(f"{name:28s} {r['resting_mb']:8.1f} {r['step_rise_mb']:10.1f} {r['peak_mb']:8.1f} {ratio:>9s}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"kind": args.kind, "pairs": args.pairs, "results": results}, indent=1))


if __name__ == "__main__":
    main()
