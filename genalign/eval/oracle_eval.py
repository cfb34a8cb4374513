"""`genalign eval`: a generator on held-out prompts, judged by the world's oracle.

Reports oracle VQ / TA (and MQ for video) means with 95% intervals over prompts, TA per prompt template, the
GenEval-style strict accuracy, and diversity (mean pairwise pixel distance between samples of the same prompt).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..world.grammar import parse_prompt
from ..world.oracle import judge_many
from .stats import mean_ci, paired_difference, per_prompt_means


def diversity(samples: np.ndarray, prompts: list[str]) -> float:
    """Mean over prompts of the mean pairwise RMS pixel distance (in [0, 1]) between that prompt's samples."""
    groups: dict[str, list[np.ndarray]] = defaultdict(list)
    for s, p in zip(samples, prompts):
        groups[p].append(s.astype(np.float32) / 255.0)
    per_prompt = []
    for items in groups.values():
        if len(items) < 2:
            continue
        d = [np.sqrt(np.mean((items[i] - items[j]) ** 2)) for i in range(len(items)) for j in range(i + 1, len(items))]
        per_prompt.append(np.mean(d))
    return float(np.mean(per_prompt)) if per_prompt else math.nan


# What TA is made of, where the oracle reports it (single-object images; videos): accuracy of each attribute.
TA_PARTS = ("color_ok", "shape_ok", "direction_ok")


def judge_samples(samples: np.ndarray, prompts: list[str], progress: bool = True,
                  workers: int | None = None) -> list[dict]:
    rows = []
    for p, j in zip(prompts, judge_many(samples, prompts, workers=workers, progress=progress)):
        parts = {k: j.details[k] for k in TA_PARTS if k in j.details}
        rows.append({"prompt": p, **j.as_dict(), "strict": j.details.get("strict", math.nan), **parts})
    return rows


def summarize(rows: list[dict], samples: np.ndarray) -> dict:
    prompts = [r["prompt"] for r in rows]
    dims = [d for d in ("VQ", "MQ", "TA") if d in rows[0]]
    out: dict = {"num_samples": len(rows), "num_prompts": len(set(prompts))}
    for d in dims + ["strict"]:
        out[d] = mean_ci(per_prompt_means(prompts, [r[d] for r in rows]).values())
    by_template: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_template[parse_prompt(p).template].append(i)
    out["TA_by_template"] = {
        t: mean_ci(per_prompt_means([prompts[i] for i in idx], [rows[i]["TA"] for i in idx]).values())
        for t, idx in sorted(by_template.items())
    }
    out["TA_parts"] = {k: mean_ci([r[k] for r in rows if k in r]) for k in TA_PARTS if any(k in r for r in rows)}
    out["diversity"] = diversity(samples, prompts)
    out["per_prompt"] = {d: per_prompt_means(prompts, [r[d] for r in rows]) for d in dims + ["strict"]}
    return out


def compare(aligned: dict, base: dict) -> dict:
    """Aligned minus base per dimension (paired by prompt), with 95% intervals; diversity ratio."""
    out = {d: paired_difference(aligned["per_prompt"][d], base["per_prompt"][d]) for d in aligned["per_prompt"]}
    out["diversity_ratio"] = aligned["diversity"] / base["diversity"] if base["diversity"] else math.nan
    return out


@torch.no_grad()
def generate(adapter, prompts: list[str], samples_per_prompt: int, seed: int, batch_size: int = 64,
             progress: bool = True, **sampling) -> tuple[np.ndarray, list[str]]:
    """Samples for every prompt, seeded per (prompt index, sample index) so runs are comparable across models."""
    from ..sampling import latents_to_uint8, sample_latents

    flat = [p for p in prompts for _ in range(samples_per_prompt)]
    outs = []
    for start in tqdm(range(0, len(flat), batch_size), desc="sampling", disable=not progress):
        chunk = flat[start : start + batch_size]
        g = torch.Generator().manual_seed(seed * 1_000_003 + start)
        lat = sample_latents(adapter, chunk, generator=g, **sampling)
        outs.append(latents_to_uint8(adapter, lat))
    return np.concatenate(outs), flat


def write_report(out_dir: Path, summary: dict, samples: np.ndarray, prompts: list[str], title: str) -> dict[str, Path]:
    """JSON with every number, a PNG sample grid and a PNG bar chart of the oracle means with intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..media import image_grid, save_png, video_strip

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "eval.json", "grid": out_dir / "samples.png", "plot": out_dir / "scores.png"}
    paths["json"].write_text(json.dumps(summary, indent=2))
    n = min(len(samples), 32)
    if samples.ndim == 5:  # videos: one strip of frames per row
        rows = [video_strip(v, scale=2) for v in samples[: min(n, 12)]]
        save_png(paths["grid"], image_grid(rows, labels=prompts[: len(rows)], ncols=1, scale=1))
    else:
        save_png(paths["grid"], image_grid(list(samples[:n]), labels=prompts[:n], ncols=8))
    dims = [d for d in ("VQ", "MQ", "TA", "strict") if d in summary]
    fig, ax = plt.subplots(figsize=(5, 3))
    means = [summary[d]["mean"] for d in dims]
    errs = [summary[d]["mean"] - summary[d]["lo"] for d in dims]
    ax.bar(dims, means, yerr=errs, capsize=4, color="#4c72b0")
    ax.set_ylim(0, 1)
    ax.set_ylabel("oracle score (95% CI)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(paths["plot"], dpi=120)
    plt.close(fig)
    return paths
