"""Small statistics used by every report: means with 95% intervals over prompts, paired differences."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np


def mean_ci(values, z: float = 1.96) -> dict[str, float]:
    """Mean with a normal-approximation 95% interval (values are per-prompt means: prompts are the unit)."""
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    half = z * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else math.nan
    return {"mean": float(v.mean()), "lo": float(v.mean() - half), "hi": float(v.mean() + half), "n": len(v)}


def per_prompt_means(prompts: list[str], values: list[float]) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for p, x in zip(prompts, values):
        groups[p].append(x)
    return {p: float(np.mean(xs)) for p, xs in groups.items()}


def paired_difference(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Mean of a - b over the prompts both have, with a 95% interval."""
    common = sorted(set(a) & set(b))
    return mean_ci([a[p] - b[p] for p in common])
