"""Flow-DPO training step: genalign's trainer vs the way public implementations do it.

genalign: FlowDPOTrainer on a latent + text-embedding cache (`genalign cache`); the reference is the same
network with its LoRA switched off (no copy); winner and loser in one batched forward, shared noise and t.
peer: a separate full frozen copy of the network as the reference; winner and loser in separate forwards (policy
and reference); the VAE encodes both images and the text encoders encode the prompt at every step; no cache.

Both variants train the same LoRA on the same model and batch. Each runs in its own subprocess so that its peak
memory (max RSS on CPU, torch.cuda.max_memory_allocated on GPU) is its own. Printed last: a table with ratios.

    python benchmarks/flow_dpo_step.py                 # CPU, the world's image architecture (random weights)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def cpu_pipeline():
    """The shipped world image model (SD3 family, 2.3M-parameter transformer), loaded with the stock class."""
    from diffusers import StableDiffusion3Pipeline

    from genalign.world import world_model_path

    return StableDiffusion3Pipeline.from_pretrained(world_model_path("image"), text_encoder_3=None, tokenizer_3=None)


def random_pairs(n: int, size: int, seed: int = 0):
    from genalign.data.preference import PreferencePair
    from genalign.world.grammar import image_splits

    rng = np.random.default_rng(seed)
    prompts = image_splits().train
    return [PreferencePair(prompts[i % len(prompts)], rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
                           rng.integers(0, 256, (size, size, 3), dtype=np.uint8), 1.0) for i in range(n)]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_memory_mb(baseline_mb: float) -> float:
    """Peak resident memory above `baseline_mb` (the process right after the model was built): what the training
    method itself costs, without the ~1 GB of libraries both variants share."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline_mb


# ------------------------------------------------------------------------------------------- variants (CPU)
def run_genalign(pairs: int, steps: int, warmup: int, threads: int) -> dict:
    from genalign.data import build_cache, load_cache
    from genalign.models import SD3Adapter
    from genalign.trainers import FlowDPOConfig, FlowDPOTrainer

    torch.set_num_threads(threads)
    adapter = SD3Adapter(cpu_pipeline())
    baseline = rss_mb()
    tmp = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    build_cache(adapter, random_pairs(pairs * (steps + 1), 32), tmp / "cache", resolution=32, progress=False)
    cache_s = time.perf_counter() - t0
    dataset = load_cache(tmp / "cache", adapter=adapter, resolution=32)
    cfg = FlowDPOConfig(output_dir=str(tmp / "run"), max_steps=steps, batch_size=pairs, lr=1e-4, log_every=1,
                        checkpoint_every=10**6, report_to="none", progress_bar=False, num_threads=threads,
                        lora_rank=16, seed=0)
    FlowDPOTrainer(adapter, cfg, dataset).train()
    records = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    elapsed = {r["step"]: r["elapsed_s"] for r in records}
    step_s = (elapsed[steps] - elapsed[warmup]) / (steps - warmup)
    return {"step_s": step_s, "cache_build_s": cache_s, "peak_mb": peak_memory_mb(baseline)}


def run_peer(pairs: int, steps: int, warmup: int, threads: int) -> dict:
    from peft import LoraConfig

    from genalign import flow
    from genalign.losses import flow_dpo_loss

    torch.set_num_threads(threads)
    pipe = cpu_pipeline()
    baseline = rss_mb()
    transformer = pipe.transformer
    reference = copy.deepcopy(transformer).requires_grad_(False).eval()  # the peer's separate full copy
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    data = random_pairs(pairs * (steps + 1), 32)
    g = torch.Generator().manual_seed(0)
    vae = pipe.vae
    shift = vae.config.shift_factor or 0.0
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        batch = data[step * pairs : (step + 1) * pairs]
        with torch.no_grad():  # VAE and text encoders every step: no cache
            px = lambda key: torch.from_numpy(np.stack([getattr(p, key) for p in batch])).permute(0, 3, 1, 2).float() / 127.5 - 1  # noqa: E731
            lat_w = (vae.encode(px("media_a")).latent_dist.sample() - shift) * vae.config.scaling_factor
            lat_l = (vae.encode(px("media_b")).latent_dist.sample() - shift) * vae.config.scaling_factor
            embeds, _, pooled, _ = pipe.encode_prompt([p.prompt for p in batch], None, None,
                                                      do_classifier_free_guidance=False, max_sequence_length=1)
        t = flow.sample_logit_normal(pairs, generator=g)
        noise = torch.randn(lat_w.shape, generator=g)
        errs = {}
        for name, x0 in (("w", lat_w), ("l", lat_l)):
            x_t = flow.interpolate(x0, noise, t)
            target = flow.velocity_target(x0, noise)
            kw = dict(hidden_states=x_t, timestep=t * 1000, encoder_hidden_states=embeds, pooled_projections=pooled)
            errs[f"model_{name}"] = ((transformer(**kw).sample - target) ** 2).mean(dim=(1, 2, 3))
            with torch.no_grad():
                errs[f"ref_{name}"] = ((reference(**kw).sample - target) ** 2).mean(dim=(1, 2, 3))
        loss, _ = flow_dpo_loss(errs["model_w"], errs["model_l"], errs["ref_w"], errs["ref_l"], beta=100.0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
    return {"step_s": float(np.mean(times[warmup:])), "peak_mb": peak_memory_mb(baseline)}


# ------------------------------------------------------------------------------------------- driver
def child(args) -> None:
    fn = {"genalign": run_genalign, "peer": run_peer}[args.variant]
    result = fn(args.pairs, args.steps, args.warmup, args.threads)
    print("RESULT " + json.dumps(result))


def measure(variant: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", "--variant", variant, "--pairs", str(args.pairs), "--steps",
           str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    results = {v: measure(v, args) for v in ("peer", "genalign")}
    g, p = results["genalign"], results["peer"]
    summary = {
        "device": "cpu", "threads": args.threads, "pairs_per_step": args.pairs, "steps_timed": args.steps - args.warmup,
        "results": results,
        "speedup": p["step_s"] / g["step_s"],
        "memory_ratio": g["peak_mb"] / p["peak_mb"],
    }
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "flow_dpo_step_cpu.json").write_text(json.dumps(summary, indent=2))
    print(f"\nFlow-DPO step, the world's image model (SD3, 2.3M params), {args.pairs} pairs, {args.threads} thread(s)")
    print(f"{'variant':10s} {'s/step':>8s} {'pairs/s':>8s} {'peak MB':>8s}")
    for name, r in (("peer", p), ("genalign", g)):
        print(f"{name:10s} {r['step_s']:8.3f} {args.pairs / r['step_s']:8.1f} {r['peak_mb']:8.0f}")
    print(f"speedup genalign vs peer: {summary['speedup']:.2f}x (target >= 1.5x); "
          f"peak memory ratio: {summary['memory_ratio']:.2f} (target <= 0.7; peak RSS above the process after model load)")


if __name__ == "__main__":
    main()
