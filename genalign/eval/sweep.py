"""`genalign sweep rlg|nrg`: guidance strength against oracle reward, diversity and a learned reward.

Every setting samples the SAME held-out prompts with the SAME seeds (`generate` seeds each batch from --seed),
so rows differ only by the guidance, and each row is compared with the first one prompt by prompt.

- `rlg`: Reinforcement Learning Guidance (ALGORITHMS.md 4) with weights `--scales` (default 0,0.5,1,1.5,2)
  between the base model (w = 0) and its fine-tuned LoRA (w = 1; default: the world's shipped aligned LoRA);
- `nrg`: Flow-NRG (ALGORITHMS.md 5) with one or more noise-aware latent reward models (`--nrg-reward`,
  repeatable; default: the world's shipped one), for each per-dimension weight setting of `--weights` (a JSON
  list; `{}` = no reward guidance, sampled once) at each strength lambda of `--nrg-scale`.

Writes to `--out`: `sweep.json` (per setting: oracle VQ / TA / strict means with 95% intervals over prompts
(`summarize`), the paired difference against the first setting (`compare`), diversity, and the learned reward's
mean per dimension when `--reward` names a reward model), `curve.png` (score against scale with 95% error bars,
one panel per oracle / learned dimension) and `strips.png` (one row per setting, the same prompts and seeds).

    genalign sweep rlg --num-prompts 64 --samples-per-prompt 4 --out runs/sweep-rlg
    genalign sweep nrg --weights '[{}, {"TA": 1}, {"VQ": 1}]' --nrg-scale 1,2,4 --out runs/sweep-nrg
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_RLG_SCALES = (0.0, 0.5, 1.0, 1.5, 2.0)
DEFAULT_NRG_WEIGHTS = '[{}, {"TA": 1}, {"VQ": 1}]'
DEFAULT_NRG_SCALES = (1.0, 2.0, 4.0)


def parse_floats(text: str, name: str) -> list[float]:
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be comma-separated finite numbers, got {text!r}")
    return values


def parse_weights(text: str) -> list[dict[str, float]]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--weights must be a JSON list of objects, e.g. {DEFAULT_NRG_WEIGHTS} ({e})") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(w, dict) for w in value):
        raise ValueError(f"--weights must be a JSON list of objects, e.g. {DEFAULT_NRG_WEIGHTS}; got {text!r}")
    return [{str(k): float(v) for k, v in w.items()} for w in value]


# ------------------------------------------------------------------------------------------ settings
def rlg_settings(scales) -> list[dict[str, Any]]:
    return [{"label": f"w={w:g}", "rlg_scale": float(w), "scale": float(w)} for w in scales]


def nrg_settings(rewards: list[str], weights: list[dict[str, float]], scales) -> list[dict[str, Any]]:
    """One `{}` (no guidance) setting first, then every (reward, non-empty weights, scale)."""
    out: list[dict[str, Any]] = []
    if any(not w for w in weights):
        out.append({"label": "none", "nrg_reward": None, "nrg_weights": {}, "nrg_scale": 0.0, "scale": 0.0})
    names = _reward_names(rewards)
    for reward, name in zip(rewards, names):
        for w in weights:
            if not w:
                continue
            wtxt = ",".join(f"{d}:{v:g}" for d, v in w.items())
            for s in scales:
                label = f"{wtxt} x{s:g}" if len(rewards) == 1 else f"{name} {wtxt} x{s:g}"
                out.append({"label": label, "nrg_reward": reward, "reward_name": name, "nrg_weights": dict(w),
                            "nrg_scale": float(s), "scale": float(s), "group": f"{name} {wtxt}" if len(rewards) > 1
                            else wtxt})
    return out


def _reward_names(paths: list[str]) -> list[str]:
    names = []
    for p in paths:
        name = Path(p).name or str(p)
        base, i = name, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.append(name)
    return names


# ------------------------------------------------------------------------------------------ learned reward
class LearnedReward:
    """`--reward`: a genalign reward model folder (scored on the decoded pixels) or a latent reward folder
    (scored on the re-encoded clean latents, t = 0). `__call__(samples, prompts) -> {dim: np.ndarray}`."""

    def __init__(self, path: str, adapter):
        from ..guidance.latent_reward import CONFIG_NAME, LatentRewardModel, latent_space_id

        self.path, self.adapter = str(path), adapter
        if (Path(path) / CONFIG_NAME).is_file():
            self.kind = "latent"
            self.model = LatentRewardModel.from_pretrained(path, latent_space=latent_space_id(adapter)).to(adapter.device)
            self.dims = tuple(self.model.dims)
        else:
            from ..rewards import load_reward_model

            self.kind = "pixels"
            self.model = load_reward_model(path).eval()
            self.dims = tuple(self.model.output_dimensions)

    @torch.no_grad()
    def __call__(self, samples: np.ndarray, prompts: list[str], batch_size: int = 64) -> dict[str, np.ndarray]:
        out: dict[str, list[np.ndarray]] = {d: [] for d in self.dims}
        for start in range(0, len(samples), batch_size):
            chunk, ps = samples[start:start + batch_size], prompts[start:start + batch_size]
            if self.kind == "latent":
                pix = torch.from_numpy(np.ascontiguousarray(chunk)).float().div(127.5).sub(1)
                pix = pix.permute(0, 3, 1, 2) if pix.ndim == 4 else pix.permute(0, 4, 1, 2, 3)
                lat = self.adapter.encode_pixels(pix.to(self.adapter.device, self.adapter.dtype)).float()
                cond = None
                if self.model.conditioning == "cond":
                    cond = {k: v.float() for k, v in self.adapter.encode_prompt(list(ps)).items()}
                scores = self.model(lat, torch.zeros(lat.shape[0], device=lat.device), cond)
            else:
                scores = self.model(list(chunk), list(ps))
                if not isinstance(scores, dict):
                    scores = {self.dims[0]: scores}
            for d in self.dims:
                out[d].append(scores[d].float().cpu().numpy())
        return {d: np.concatenate(v) for d, v in out.items()}


# ------------------------------------------------------------------------------------------ the sweep
def run_sweep(kind: str, adapter, settings: list[dict[str, Any]], prompts: list[str], *, samples_per_prompt: int,
              seed: int, sampling: dict[str, Any], lora_loaded: bool = False, rlg_scale: float | None = None,
              learned: LearnedReward | None = None, batch_size: int = 64, progress: bool = True
              ) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """Sample, judge and summarise every setting. Returns (rows, samples per setting)."""
    from ..cli import guidance_combiner
    from ..guidance import GuidanceError
    from ..guidance.latent_reward import LatentRewardModel, latent_space_id
    from .oracle_eval import compare, generate, judge_samples, summarize
    from .stats import mean_ci, per_prompt_means

    loaded: dict[str, Any] = {}
    space = latent_space_id(adapter)
    rows, all_samples = [], []
    for i, st in enumerate(settings):
        t0 = time.time()
        if kind == "rlg":
            combiner = guidance_combiner(adapter, guidance_scale=sampling["guidance_scale"], rlg_scale=st["rlg_scale"])
        else:
            reward = None
            if st.get("nrg_reward"):
                path = st["nrg_reward"]
                if path not in loaded:
                    loaded[path] = LatentRewardModel.from_pretrained(path, latent_space=space).to(adapter.device)
                reward = loaded[path]
            if rlg_scale is not None and not lora_loaded:
                raise GuidanceError("--rlg-scale needs --lora")
            combiner = guidance_combiner(adapter, guidance_scale=sampling["guidance_scale"], rlg_scale=rlg_scale,
                                         nrg_reward=reward, nrg_weights=st["nrg_weights"] or None,
                                         nrg_scale=st["nrg_scale"])
        samples, flat = generate(adapter, prompts, samples_per_prompt, seed=seed, batch_size=batch_size,
                                 progress=progress, combiner=combiner, **sampling)
        judged = judge_samples(samples, flat, progress=False)
        summary = summarize(judged, samples)
        row = {k: v for k, v in st.items()}
        row["oracle"] = {d: summary[d] for d in ("VQ", "MQ", "TA", "strict") if d in summary}
        row["TA_by_template"] = summary["TA_by_template"]
        row["diversity"] = summary["diversity"]
        row["per_prompt"] = summary["per_prompt"]
        if learned is not None:
            scores = learned(samples, flat)
            row["learned"] = {d: mean_ci(per_prompt_means(flat, v.tolist()).values()) for d, v in scores.items()}
            row["per_prompt_learned"] = {d: per_prompt_means(flat, v.tolist()) for d, v in scores.items()}
        row["vs_first"] = compare(summary, rows[0]["_summary"]) if rows else None
        if rows and learned is not None:
            from .stats import paired_difference

            for d in row["learned"]:
                row["vs_first"][f"learned/{d}"] = paired_difference(row["per_prompt_learned"][d],
                                                                     rows[0]["per_prompt_learned"][d])
        row["seconds"] = round(time.time() - t0, 1)
        row["_summary"] = summary
        rows.append(row)
        all_samples.append(samples)
        if progress:
            ta, vq = row["oracle"].get("TA", {}), row["oracle"].get("VQ", {})
            print(f"[{i + 1}/{len(settings)}] {st['label']}: TA {ta.get('mean', math.nan):.3f} "
                  f"VQ {vq.get('mean', math.nan):.3f} diversity {row['diversity']:.4f} ({row['seconds']} s)",
                  file=sys.stderr)
    for row in rows:
        row.pop("_summary")
    return rows, all_samples


# ------------------------------------------------------------------------------------------ outputs
def _groups(kind: str, rows: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Lines of the curve: RLG is one line; NRG one per (reward, weights), each starting at the no-guidance row."""
    if kind == "rlg":
        return {"RLG": list(range(len(rows)))}
    base = [i for i, r in enumerate(rows) if not r.get("nrg_weights")]
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        if r.get("nrg_weights"):
            groups.setdefault(r["group"], list(base)).append(i)
    return groups or {"none": base}


def plot_curve(kind: str, rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("oracle", d) for d in ("TA", "VQ", "MQ") if d in rows[0]["oracle"]]
    if rows[0].get("learned"):
        panels += [("learned", d) for d in rows[0]["learned"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    xlabel = "RLG weight w" if kind == "rlg" else "NRG strength lambda"
    for ax, (source, d) in zip(axes[0], panels):
        for name, idx in _groups(kind, rows).items():
            xs = [rows[i]["scale"] for i in idx]
            ms = [rows[i][source][d]["mean"] for i in idx]
            err = [[m - rows[i][source][d]["lo"] for i, m in zip(idx, ms)],
                   [rows[i][source][d]["hi"] - m for i, m in zip(idx, ms)]]
            err = np.nan_to_num(np.asarray(err, dtype=float))
            ax.errorbar(xs, ms, yerr=err, marker="o", capsize=3, label=name)
        positive = [r["scale"] for r in rows if r["scale"] > 0]
        if kind == "nrg" and positive and max(positive) / min(positive) >= 8:
            ax.set_xscale("symlog", linthresh=min(positive))  # strengths spread over decades; 0 stays in view
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{source} {d} (95% CI)")
        ax.set_title(f"{source} {d}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_strips(rows: list[dict[str, Any]], samples: list[np.ndarray], prompts_flat: list[str],
                samples_per_prompt: int, path: Path, per_row: int = 8) -> Path:
    """One row per setting, labelled on the left: sample 0 of the first `per_row` prompts (the same seeds in
    every row), the prompts under each picture."""
    import textwrap

    from PIL import Image, ImageDraw

    from ..media import image_grid, save_png, video_strip

    idx = list(range(0, len(prompts_flat), samples_per_prompt))[:per_row]
    scale = 3 if samples[0].ndim == 5 else 4
    grids = []
    for s in samples:
        images = [video_strip(s[i], 1) if s[i].ndim == 4 else s[i] for i in idx]
        grids.append(image_grid(images, labels=[prompts_flat[i] for i in idx], ncols=len(idx), scale=scale))
    width = 7 * 24  # room for labels of up to 24 characters a line
    canvas = Image.new("RGB", (width + grids[0].shape[1], sum(g.shape[0] for g in grids)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = 0
    for row, grid in zip(rows, grids):
        canvas.paste(Image.fromarray(grid), (width, y))
        lines = textwrap.wrap(row["label"], 24) or [""]
        top = y + max(4, grid.shape[0] // 2 - 6 * len(lines))
        for k, line in enumerate(lines):
            draw.text((4, top + 12 * k), line, fill=(0, 0, 0))
        y += grid.shape[0]
    save_png(path, np.asarray(canvas))
    return path


# ------------------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genalign sweep", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="sweep", required=True)
    for name, help_text in (("rlg", "RLG weight w between the base model and its LoRA"),
                            ("nrg", "Flow-NRG per-dimension weights and strength with latent reward models")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--model", default=None, help="pipeline folder or hub id (default: the world's image model)")
        p.add_argument("--kind", choices=["image", "video"], default=None, help="which world model when --model is unset")
        p.add_argument("--lora", default=None, help="rlg: the fine-tuned LoRA (default: the world's shipped aligned "
                                                     "LoRA); nrg: optional, with --rlg-scale, NRG on top of RLG")
        p.add_argument("--prompts", default="heldout", help="'heldout' (the world's split) or a prompts file")
        p.add_argument("--num-prompts", type=int, default=64)
        p.add_argument("--samples-per-prompt", type=int, default=4)
        p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
        p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
        p.add_argument("--height", type=int, default=None)
        p.add_argument("--width", type=int, default=None)
        p.add_argument("--num-frames", type=int, default=None, help="video models only")
        p.add_argument("--seed", type=int, default=0, help="the same seeds for every setting")
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--reward", default=None, help="a learned reward to report next to the oracle: a genalign "
                                                       "reward model folder or a latent reward folder")
        p.add_argument("--strip-prompts", type=int, default=8, help="prompts per row of strips.png")
        p.add_argument("--out", default=f"runs/sweep-{name}")
        if name == "rlg":
            p.add_argument("--scales", default=",".join(f"{s:g}" for s in DEFAULT_RLG_SCALES),
                           help="comma-separated RLG weights w (0 = base, 1 = LoRA, > 1 extrapolates)")
        else:
            p.add_argument("--nrg-reward", action="append", default=None,
                           help="a noise-aware latent reward folder (repeatable: compared at the same weights; "
                                "default: the world's shipped one)")
            p.add_argument("--weights", default=DEFAULT_NRG_WEIGHTS,
                           help='JSON list of per-dimension weights; {} = no reward guidance (default: '
                                f"{DEFAULT_NRG_WEIGHTS})")
            p.add_argument("--nrg-scale", default=",".join(f"{s:g}" for s in DEFAULT_NRG_SCALES),
                           help="comma-separated NRG strengths lambda")
            p.add_argument("--rlg-scale", type=float, default=None, help="apply NRG on top of RLG with this w "
                                                                          "(needs --lora)")
    return parser


def sweep_main(argv: list[str] | None = None) -> int:
    from ..cli import _sampling_kwargs, _user_errors, eval_prompts, load_model
    from ..guidance import GuidanceError

    args = build_parser().parse_args(argv)
    try:
        kind = args.sweep
        lora = args.lora
        # the numbers first: a bad value fails before any model is loaded
        if kind == "rlg":
            from ..guidance import check_weight

            scales = [check_weight("--scales", w) for w in parse_floats(args.scales, "--scales")]
        else:
            weights = parse_weights(args.weights)
            scales = parse_floats(args.nrg_scale, "--nrg-scale")
            if any(s < 0 for s in scales):
                raise ValueError(f"--nrg-scale values are strengths lambda >= 0, got {args.nrg_scale!r}")
            if args.rlg_scale is not None and not lora:
                raise GuidanceError("--rlg-scale mixes the base model with a fine-tuned one: give the LoRA with --lora")
        if kind == "rlg" and lora is None:
            from ..world import aligned_lora_path

            lora = str(aligned_lora_path(args.kind or "image"))
        adapter, defaults, model_path, _ = load_model(args.model, args.kind, [lora] if lora else [])
        prompts = eval_prompts(args.prompts, adapter, args.num_prompts)
        sampling = _sampling_kwargs(args, defaults, adapter)
        if kind == "rlg":
            settings = rlg_settings(scales)
            rewards: list[str] = []
        else:
            rewards = list(args.nrg_reward or [])
            if not rewards:
                from ..world import latent_reward_path

                rewards = [str(latent_reward_path("video" if adapter.is_video else "image"))]
            settings = nrg_settings(rewards, weights, scales)
        learned = LearnedReward(args.reward, adapter) if args.reward else None
        t0 = time.time()
        rows, samples = run_sweep(kind, adapter, settings, prompts, samples_per_prompt=args.samples_per_prompt,
                                  seed=args.seed, sampling=sampling, lora_loaded=bool(lora),
                                  rlg_scale=getattr(args, "rlg_scale", None), learned=learned,
                                  batch_size=args.batch_size)
    except (*_user_errors(), ValueError) as e:
        print(f"genalign sweep {args.sweep}: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    flat = [p for p in prompts for _ in range(args.samples_per_prompt)]
    report = {"kind": kind, "model": model_path, "lora": lora, "nrg_rewards": rewards, "reward": args.reward,
              "sampling": sampling, "seed": args.seed, "num_prompts": len(prompts),
              "samples_per_prompt": args.samples_per_prompt, "prompts": prompts,
              "seconds": round(time.time() - t0, 1), "settings": rows}
    if kind == "nrg":
        report["rlg_scale"] = args.rlg_scale
    (out / "sweep.json").write_text(json.dumps(report, indent=2))
    title = f"{Path(model_path).name}: {kind.upper()} sweep, {len(prompts)} prompts x {args.samples_per_prompt}"
    plot_curve(kind, rows, out / "curve.png", title)
    plot_strips(rows, samples, flat, args.samples_per_prompt, out / "strips.png", per_row=args.strip_prompts)
    print(format_table(report))
    print(f"wrote {out / 'sweep.json'}, {out / 'curve.png'}, {out / 'strips.png'}")
    return 0


def format_table(report: dict[str, Any]) -> str:
    """One line per setting: oracle means [95% CI], difference vs the first row, diversity, learned means."""
    lines = []
    for r in report["settings"]:
        cells = [f"{r['label']:<22s}"]
        for d in ("TA", "VQ", "MQ"):
            if d in r["oracle"]:
                m = r["oracle"][d]
                diff = ""
                if r["vs_first"] is not None:
                    diff = f" ({r['vs_first'][d]['mean']:+.3f})"
                cells.append(f"{d} {m['mean']:.3f} [{m['lo']:.3f},{m['hi']:.3f}]{diff}")
        cells.append(f"div {r['diversity']:.4f}")
        for d, m in (r.get("learned") or {}).items():
            cells.append(f"learned {d} {m['mean']:+.3f}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(sweep_main())
