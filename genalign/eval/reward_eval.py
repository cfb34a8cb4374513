"""Reward-model evaluation: per-dimension preference accuracy next to a ceiling and a chance baseline, and the
`genalign score` / `genalign eval-reward` commands.

    from genalign.eval.reward_eval import evaluate_reward, write_reward_report
    result = evaluate_reward(load_reward_model("runs/reward/reward_model"), "heldout_pairs.parquet")
    write_reward_report(result, "runs/reward/eval")        # reward_eval.json + reward_eval.png

For every output dimension of the model that has labels in the data (a CLIP reward's "score" against the pairs'
overall label; VideoReward's VQ / MQ / TA against the per-dimension labels and "Overall" against the overall
label, the weighted vote of `genalign.data`), the result holds (ALGORITHMS.md 3d, `genalign.losses.reward`):

- `accuracy_without_ties`: C / (C + D + T_model) over the pairs the humans labelled with a winner;
- `accuracy_with_ties`: the "Ties Matter" (arXiv 2305.14324) tie-calibrated accuracy over all labelled pairs,
  with the best tie threshold `epsilon` on |r_A - r_B|;
- `chance_without_ties` = 0.5; `chance_with_ties` = the best constant prediction: the largest share among
  "A wins", "B wins" and "tie";
- `ceiling_*`: the same two accuracies of the noise-free oracle label against the (noisy) annotators' labels:
  what a perfect model of the underlying preference would score on these labels. Only for data that carry
  oracle labels, as the world's pairs do (`oracle_label` in Pick-a-Pic parquet, `oracle_VQ` / `oracle_MQ` /
  `oracle_TA` in VideoAlign CSV, the same keys in jsonl rows); the overall oracle label of VideoAlign data is
  the vote of the oracle dimensions with `label_weights` (default: weight 1 each, as `load_preference_pairs`).

Pairs are read with tie_policy="half" (ties are kept: the with-ties accuracy needs them); labels are the ones
before any tie policy. Scores are the model's default ones (normalised, when the checkpoint carries
normalisation): the accuracies of a single dimension do not depend on it, the overall dimension's do.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.preference import parse_label
from ..files import publish_dir
from ..losses.reward import accuracy_with_ties, accuracy_without_ties
from .stats import mean_ci

REPORT_JSON = "reward_eval.json"
REPORT_PNG = "reward_eval.png"
ORACLE_OVERALL = "oracle_label"
DEFAULT_LABEL_WEIGHTS = {"VQ": 1.0, "MQ": 1.0, "TA": 1.0}
OVERALL = "__overall__"  # the label source of a model's overall / single dimension: the pair's overall label


class RewardCLIError(ValueError):
    """An input of `genalign score` / `genalign eval-reward` a user can fix (printed as one line)."""


# ------------------------------------------------------------------------------------------- labels
def _label_value(value) -> float:
    """A label cell -> 1.0 / 0.0 / 0.5, or NaN when it is missing or unknown (genalign.data's parsing)."""
    label = parse_label(value)
    return math.nan if label is None else label


def _vote(labels: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """The weighted vote of per-dimension labels (as `genalign.data`); NaN when a weighted label is missing."""
    if any(w and (d not in labels or math.isnan(labels[d])) for d, w in weights.items()):
        return math.nan
    score = sum(w * (2.0 * labels[d] - 1.0) for d, w in weights.items() if w)
    return 1.0 if score > 1e-9 else 0.0 if score < -1e-9 else 0.5


def _records(pairs) -> list[dict[str, Any]]:
    """Per pair: prompt, overall label (before the tie policy), per-dimension labels, meta, file and row."""
    out = []
    if hasattr(pairs, "records"):  # a PreferenceDataset: everything without decoding
        for r in pairs.records:
            out.append({"label": r.raw_label, "labels": dict(r.labels or {}), "meta": dict(r.meta or {}),
                        "file": r.file, "row": r.row, "prompt": r.prompt})
        return out
    for p in pairs:  # PreferencePair-like objects
        out.append({"label": float(p.label), "labels": dict(p.labels or {}), "meta": dict(p.meta or {}),
                    "file": None, "row": None, "prompt": p.prompt})
    return out


def read_oracle_labels(records: list[dict[str, Any]], label_dims: Sequence[str],
                       label_weights: Mapping[str, float] | None = None) -> dict[str, list[float]] | None:
    """Noise-free labels per label dimension (OVERALL for the overall label), one per record (NaN where a row
    has none), read from the pairs' files (parquet / CSV columns) or their meta (jsonl keys). None when the data
    carry no oracle labels at all."""
    weights = dict(label_weights or DEFAULT_LABEL_WEIGHTS)
    per_dim = [d for d in label_dims if d != OVERALL]
    columns = {OVERALL: ORACLE_OVERALL, **{d: f"oracle_{d}" for d in set(per_dim) | set(weights)}}
    tables: dict[str, dict[str, list]] = {}
    for file in sorted({r["file"] for r in records if r["file"]}):
        path = Path(file)
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            names = pq.ParquetFile(path).schema_arrow.names
            wanted = [c for c in set(columns.values()) if c in names]
            tables[file] = pq.read_table(path, columns=wanted).to_pydict() if wanted else {}
        elif path.suffix.lower() in (".csv", ".tsv"):
            with open(path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
                rows = list(reader)
            names = [c.strip() for c in (reader.fieldnames or [])]
            wanted = [c for c in set(columns.values()) if c in names]
            tables[file] = {c: [row.get(c) for row in rows] for c in wanted}

    def cell(record, column):
        if column in record["meta"]:
            return record["meta"][column]
        table = tables.get(record["file"] or "", {})
        values = table.get(column)
        if values is None or record["row"] is None or record["row"] >= len(values):
            return None
        return values[record["row"]]

    found = False
    out: dict[str, list[float]] = {d: [] for d in label_dims}
    for r in records:
        dim_values = {d: _label_value(cell(r, columns[d])) for d in columns if d != OVERALL}
        for d in label_dims:
            if d == OVERALL:
                value = _label_value(cell(r, ORACLE_OVERALL))
                if math.isnan(value) and r["labels"]:  # per-dimension data: the vote of the oracle dimensions
                    value = _vote(dim_values, {k: w for k, w in weights.items() if k in r["labels"]} or weights)
            else:
                value = dim_values[d]
            found = found or not math.isnan(value)
            out[d].append(value)
    return out if found else None


# ------------------------------------------------------------------------------------------- evaluation
def _resolve_dims(model, records, dims) -> dict[str, str]:
    """{model output dimension: label dimension (a per-dimension label name, or OVERALL)}."""
    label_dims = list(dict.fromkeys(d for r in records for d in r["labels"]))
    outputs = list(model.output_dimensions)
    overall = model.overall_dimension or (model.dimensions[0] if len(model.dimensions) == 1 else None)
    if dims is None:
        mapping = {}
        for d in outputs:
            if d in label_dims:
                mapping[d] = d
            elif d == overall:
                mapping[d] = OVERALL
        if not mapping:
            raise RewardCLIError(f"the data's labels ({label_dims or ['overall']}) fit none of the model's "
                                 f"dimensions {outputs}")
        return mapping
    if isinstance(dims, str):
        dims = [d.strip() for d in dims.split(",") if d.strip()]
    if not isinstance(dims, Mapping):
        dims = {d: (d if d in label_dims else OVERALL if d == overall else d) for d in dims}
    mapping = {}
    for model_dim, label_dim in dims.items():
        if model_dim not in outputs:
            raise RewardCLIError(f"unknown dimension {model_dim!r}: the model has {outputs}")
        if label_dim in ("overall", "Overall", "label", OVERALL):
            label_dim = label_dim if label_dim in label_dims else OVERALL
        if label_dim != OVERALL and label_dim not in label_dims:
            raise RewardCLIError(f"dimension {model_dim!r}: the data have no {label_dim!r} labels (they have "
                                 f"{label_dims or 'only an overall label'})")
        mapping[model_dim] = label_dim
    return mapping


def _fps_of(meta: Mapping[str, Any], side: str) -> float | None:
    for key in (f"fps_{side}", f"fps_{side.upper()}"):
        value = meta.get(key)
        if value not in (None, ""):
            try:
                return float(value)
            except (TypeError, ValueError):
                return None
    return None


def score_pairs(model, pairs, indices: Sequence[int], batch_size: int = 32,
                progress: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Scores of media A and B of `pairs[i]` for i in indices: {output dimension: (scores_a, scores_b)}."""
    from tqdm.auto import tqdm

    chunks: dict[str, tuple[list, list]] = {d: ([], []) for d in model.output_dimensions}
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(indices), batch_size), desc="scoring pairs", disable=not progress,
                          mininterval=2):
            items = [pairs[i] for i in indices[start:start + batch_size]]
            n = len(items)
            media = [p.media_a for p in items] + [p.media_b for p in items]
            prompts = [p.prompt for p in items] * 2
            fps = [_fps_of(p.meta or {}, "a") for p in items] + [_fps_of(p.meta or {}, "b") for p in items]
            with torch.no_grad():
                scores = model.score_dict(media, prompts, fps=fps, batch_size=2 * n)
            for d, s in scores.items():
                s = s.detach().float().cpu().numpy()
                chunks[d][0].append(s[:n])
                chunks[d][1].append(s[n:])
    finally:
        model.train(was_training)
    return {d: (np.concatenate(a) if a else np.zeros(0), np.concatenate(b) if b else np.zeros(0))
            for d, (a, b) in chunks.items()}


def _label_counts(labels: np.ndarray) -> dict[str, int]:
    return {"A": int((labels == 1.0).sum()), "B": int((labels == 0.0).sum()), "tie": int((labels == 0.5).sum())}


def _oracle_delta(oracle: np.ndarray) -> np.ndarray:
    """An oracle label as a score difference: A wins +1, B wins -1, tie 0."""
    return np.where(oracle == 1.0, 1.0, np.where(oracle == 0.0, -1.0, 0.0))


def dimension_metrics(delta: np.ndarray, labels: np.ndarray, oracle: np.ndarray | None = None) -> dict[str, Any]:
    """Accuracies of score differences `delta` against `labels` (1 / 0 / 0.5, NaN = none), the chance
    baselines and, given the oracle labels, the ceilings (module docstring)."""
    delta, labels = np.asarray(delta, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    without, with_ties = accuracy_without_ties(delta, labels), accuracy_with_ties(delta, labels)
    valid = np.isin(labels, (0.0, 0.5, 1.0))
    counts = _label_counts(labels[valid])
    n_valid = int(valid.sum())
    out: dict[str, Any] = {
        "accuracy_without_ties": without["accuracy"],
        "accuracy_with_ties": with_ties["accuracy"],
        "epsilon": with_ties["epsilon"],
        "pairs_without_ties": without["pairs"],
        "pairs_with_ties": with_ties["pairs"],
        "concordant": without["concordant"],
        "discordant": without["discordant"],
        "model_ties": without["model_ties"],
        "label_counts": counts,
        "chance_without_ties": 0.5 if without["pairs"] else math.nan,
        "chance_with_ties": max(counts.values()) / n_valid if n_valid else math.nan,
    }
    if oracle is not None:
        oracle = np.asarray(oracle, dtype=np.float64)
        has = valid & np.isin(oracle, (0.0, 0.5, 1.0))
        if has.any():
            o_delta = _oracle_delta(oracle[has])
            out["ceiling_without_ties"] = accuracy_without_ties(o_delta, labels[has])["accuracy"]
            out["ceiling_with_ties"] = accuracy_with_ties(o_delta, labels[has])["accuracy"]
            out["pairs_with_oracle"] = int(has.sum())
    return out


def paired_accuracy_difference(delta: np.ndarray, other_delta: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Accuracy without ties of one model minus another's on the same pairs, with a 95% interval that treats the
    pairs as the unit: on every pair labelled with a winner, each model is right (1) or not (0; a model tie is
    not right, as in C / (C + D + T_model)). Pairs two models both get right or both wrong add nothing, so this
    interval is much narrower than the two accuracies' own."""
    labels = np.asarray(labels, dtype=np.float64)
    decided = np.isin(labels, (0.0, 1.0))
    winner = np.where(labels[decided] == 1.0, 1.0, -1.0)
    right = (np.asarray(delta, dtype=np.float64)[decided] * winner > 0).astype(np.float64)
    right_other = (np.asarray(other_delta, dtype=np.float64)[decided] * winner > 0).astype(np.float64)
    diff = mean_ci(right - right_other)
    return {"difference": diff["mean"], "lo": diff["lo"], "hi": diff["hi"], "pairs": diff["n"],
            "accuracy": float(right.mean()) if diff["n"] else math.nan,
            "accuracy_other": float(right_other.mean()) if diff["n"] else math.nan}


def _load_pairs(pairs, label_weights=None):
    if isinstance(pairs, (str, os.PathLike)) or (isinstance(pairs, (list, tuple)) and pairs
                                                 and isinstance(pairs[0], (str, os.PathLike))):
        from ..data import load_preference_pairs

        return load_preference_pairs(pairs, tie_policy="half")
    return pairs


def evaluate_reward(model, pairs_dataset, dims=None, *, batch_size: int = 32, max_pairs: int | None = None,
                    label_weights: Mapping[str, float] | None = None, oracle: bool = True,
                    progress: bool = False, against=None) -> dict[str, Any]:
    """Per-dimension accuracy of `model` on preference pairs, with ceiling and chance (module docstring).

    model: a genalign reward model. pairs_dataset: a path (read with tie_policy="half"), a
    `PreferenceDataset` or a list of `PreferencePair`s. dims: None (every model dimension the data label), a
    list / comma-separated names of model dimensions, or {model dimension: label dimension} ("overall" for the
    pairs' overall label). max_pairs: evaluate the first N pairs only. Returns a JSON-serialisable dict with
    "dimensions": {dim: metrics} (see `dimension_metrics`).

    against: another reward model with the same output dimensions, scored on the same pairs: "against" holds its
    metrics and "paired" the difference of the two accuracies without ties per dimension, with a 95% interval
    (`paired_accuracy_difference`; "paired_oracle" the same against the oracle's labels, for data that carry them).
    """
    pairs = _load_pairs(pairs_dataset, label_weights)
    records = _records(pairs)
    if max_pairs:
        records = records[:max_pairs]
    if not records:
        raise RewardCLIError("no preference pairs to evaluate")
    mapping = _resolve_dims(model, records, dims)
    oracle_labels = read_oracle_labels(records, sorted(set(mapping.values())), label_weights) if oracle else None
    scores = score_pairs(model, pairs, list(range(len(records))), batch_size=batch_size, progress=progress)
    if against is not None:
        missing = sorted(set(mapping) - set(against.output_dimensions))
        if missing:
            raise RewardCLIError(f"the model to compare against has no dimension {', '.join(missing)} "
                                 f"(it has {', '.join(against.output_dimensions)})")
        other_scores = score_pairs(against, pairs, list(range(len(records))), batch_size=batch_size,
                                   progress=progress)

    result: dict[str, Any] = {
        "model_kind": model.kind,
        "data": str(getattr(pairs, "source", "")),
        "pairs": len(records),
        "has_oracle": oracle_labels is not None,
        "normalized": bool(model.normalize),
        "dimensions": {},
    }
    if against is not None:
        result.update(against={}, paired={}, **({"paired_oracle": {}} if oracle_labels is not None else {}))
    for model_dim, label_dim in mapping.items():
        if label_dim == OVERALL:
            labels = np.array([r["label"] for r in records], dtype=np.float64)
        else:
            labels = np.array([r["labels"].get(label_dim, math.nan) for r in records], dtype=np.float64)
        truth = None if oracle_labels is None else np.array(oracle_labels[label_dim], dtype=np.float64)
        a, b = scores[model_dim]
        metrics = dimension_metrics(a - b, labels, truth)
        metrics["label"] = "overall" if label_dim == OVERALL else label_dim
        result["dimensions"][model_dim] = metrics
        if against is not None:
            other_a, other_b = other_scores[model_dim]
            result["against"][model_dim] = dimension_metrics(other_a - other_b, labels, truth)
            result["paired"][model_dim] = paired_accuracy_difference(a - b, other_a - other_b, labels)
            if truth is not None:
                result["paired_oracle"][model_dim] = paired_accuracy_difference(a - b, other_a - other_b, truth)
    return result


# ------------------------------------------------------------------------------------------- report
def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return _json_safe(obj.item())
    return obj


def write_reward_report(result: dict[str, Any], out_dir: str | os.PathLike, title: str = "") -> dict[str, Path]:
    """`reward_eval.json` (every number; NaN as null) and `reward_eval.png` (bars per dimension: chance, the
    model and, with oracle labels, the ceiling; without ties and with ties side by side)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / REPORT_JSON, "plot": out / REPORT_PNG}
    paths["json"].write_text(json.dumps(_json_safe(result), indent=2))

    dims = list(result["dimensions"])
    series = [("chance", "chance", "#bbbbbb"), ("model", "accuracy", "#4c72b0")]
    if result.get("has_oracle"):
        series.append(("ceiling (oracle)", "ceiling", "#55a868"))
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 2.2 * len(dims) + 2), 3.2), sharey=True)
    width = 0.8 / len(series)
    x = np.arange(len(dims))
    for ax, suffix, name in ((axes[0], "without_ties", "without ties"), (axes[1], "with_ties", "with ties")):
        for k, (label, key, color) in enumerate(series):
            values = [result["dimensions"][d].get(f"{key}_{suffix}", math.nan) for d in dims]
            values = [0.0 if v is None or not math.isfinite(v) else v for v in values]
            bars = ax.bar(x + (k - (len(series) - 1) / 2) * width, values, width, label=label, color=color)
            for bar, v in zip(bars, values):
                ax.text(bar.get_x() + bar.get_width() / 2, v + 0.01, f"{100 * v:.0f}", ha="center", fontsize=7)
        ax.set_xticks(x, dims)
        ax.set_ylim(0, 1.08)
        ax.set_title(f"accuracy {name}", fontsize=9)
    axes[0].set_ylabel("share of pairs")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=len(series), frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(paths["plot"], dpi=120)
    plt.close(fig)
    return paths


def format_table(result: dict[str, Any]) -> str:
    """The evaluation as a text table (percentages)."""

    def pct(v):
        return "    -" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * v:5.1f}"

    oracle = result.get("has_oracle")
    head = f"{'dimension':10s} {'label':8s} | {'pairs':>5s} {'acc':>5s} {'chance':>6s}"
    head += f" {'ceil':>5s}" if oracle else ""
    head += f" | {'pairs':>5s} {'acc':>5s} {'chance':>6s}" + (f" {'ceil':>5s}" if oracle else "")
    w = 24 if oracle else 18
    lines = [f"{'':20s}| {'without ties':^{w}s} | {'with ties (Ties Matter)':^{w}s}", head]
    for dim, m in result["dimensions"].items():
        line = (f"{dim:10s} {m['label']:8s} | {m['pairs_without_ties']:5d} {pct(m['accuracy_without_ties'])} "
                f"{pct(m['chance_without_ties']):>6s}")
        line += f" {pct(m.get('ceiling_without_ties'))}" if oracle else ""
        line += f" | {m['pairs_with_ties']:5d} {pct(m['accuracy_with_ties'])} {pct(m['chance_with_ties']):>6s}"
        line += f" {pct(m.get('ceiling_with_ties'))}" if oracle else ""
        lines.append(line)
    for key, what in (("paired", "labels"), ("paired_oracle", "oracle")):
        for dim, d in (result.get(key) or {}).items():
            lines.append(f"{dim:10s} minus --against, vs {what:6s}: {100 * d['difference']:+5.1f} "
                         f"[{100 * d['lo']:+5.1f}, {100 * d['hi']:+5.1f}] points ({d['pairs']} decided pairs; "
                         f"{pct(d['accuracy'])} vs {pct(d['accuracy_other'])})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- commands
def _load_model_or_fail(path: str, kind: str | None, batch_size: int | None = None, normalize: bool = True,
                        flag: str = "--model"):
    from ..rewards import detect_reward_kind, load_reward_model
    from ..rewards.base import read_reward_config

    kinds = {"pickscore": "clip", "clip": "clip", "videoreward": "video_reward", "video_reward": "video_reward"}
    if not Path(path).exists():
        raise RewardCLIError(f"{flag} {path!r}: no such reward model folder")
    if kind is not None:
        found = detect_reward_kind(path)
        if found == "ensemble":  # an ensemble is of its members' kind
            found = "/".join(sorted(set(read_reward_config(path).get("config", {}).get("member_kinds", ["?"]))))
        if found != kinds[kind]:
            raise RewardCLIError(f"{flag} {path!r} holds a {found!r} reward model, not a {kinds[kind]!r} one "
                                 f"(--kind {kind})")
    model = load_reward_model(path, normalize=normalize, **({"batch_size": batch_size} if batch_size else {}))
    return model


def _user_errors() -> tuple[type[BaseException], ...]:
    from ..config import ConfigError
    from ..data.errors import DataError
    from ..rewards import RewardLoadError

    return (RewardCLIError, DataError, RewardLoadError, ConfigError, FileNotFoundError)


def _run(prog: str, fn, args) -> int:
    try:
        return fn(args)
    except _user_errors() as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


def _expand_media(items: Sequence[str]) -> list[Path]:
    """Files, and folders expanded into their media: image and video files, and subfolders (read as videos made
    of frames). A folder that holds only subfolders gives one video per subfolder."""
    from ..data.media import IMAGE_EXTS, VIDEO_EXTS

    out: list[Path] = []
    for item in items:
        p = Path(item)
        if not p.exists():
            raise RewardCLIError(f"{item}: no such file or folder")
        if p.is_dir():
            entries = sorted(e for e in p.iterdir() if not e.name.startswith(".") and (
                e.is_dir() or e.suffix.lower() in IMAGE_EXTS | VIDEO_EXTS))
            if not entries:
                raise RewardCLIError(f"{item}: the folder holds no images, videos or frame folders")
            out += entries
        else:
            out.append(p)
    return out


def _read_media(paths: Sequence[Path]) -> list[np.ndarray]:
    from ..data.errors import DataError
    from ..data.media import load_media, media_kind_of_path

    media = []
    for p in paths:
        kind = media_kind_of_path(p)
        try:
            media.append(load_media(p, kind))
        except Exception as e:  # decoders fail in many ways; the message must name the file
            reason = str(getattr(e, "reason", "") or e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"cannot read this {kind} ({type(e).__name__}: {reason})", file=p) from e
    return media


def _score(args) -> int:
    from ..data.prompts import read_prompts

    paths = _expand_media(args.files)
    prompts = list(args.prompt or [])
    source = "--prompt"
    if args.prompts:
        if prompts:
            raise RewardCLIError("give --prompt or --prompts, not both")
        prompts = [r.prompt for r in read_prompts(args.prompts)]
        source = args.prompts
    if not prompts:
        raise RewardCLIError("give the prompt: --prompt TEXT (one for all files, or one per file) or --prompts FILE")
    if len(prompts) == 1:
        prompts = prompts * len(paths)
    if len(prompts) != len(paths):
        raise RewardCLIError(f"{len(paths)} media files but {len(prompts)} prompts ({source}): give one prompt "
                             "for all of them or exactly one per file (folders count their files)")
    model = _load_model_or_fail(args.model, args.kind, args.batch_size, normalize=not args.raw)
    media = _read_media(paths)
    with torch.no_grad():
        scores = model.score_dict(media, prompts, fps=args.fps)
    dims = list(scores)
    rows = [{"file": str(p), "prompt": prompt, **{d: float(scores[d][i]) for d in dims}}
            for i, (p, prompt) in enumerate(zip(paths, prompts))]
    width = max(len("file"), *(len(r["file"]) for r in rows))
    pwidth = min(40, max(len("prompt"), *(len(r["prompt"]) for r in rows)))
    print(f"{'file':{width}s}  {'prompt':{pwidth}s}  " + "  ".join(f"{d:>9s}" for d in dims))
    for r in rows:
        prompt = r["prompt"] if len(r["prompt"]) <= pwidth else r["prompt"][: pwidth - 3] + "..."
        print(f"{r['file']:{width}s}  {prompt:{pwidth}s}  " + "  ".join(f"{r[d]:9.4f}" for d in dims))
    kind = "raw" if args.raw else ("normalised" if any(
        s != {"mean": 0.0, "std": 1.0} for s in model.normalization.values()) else "raw (no normalisation stored)")
    print(f"({kind} scores of {args.model}, {model.kind})")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"model": args.model, "kind": model.kind, "normalized": not args.raw,
                                   "scores": rows}, indent=2))
        print(f"wrote {out}")
    return 0


def score_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genalign score", description="Score images or videos with a reward model "
                                "and print a table (one row per file).")
    p.add_argument("files", nargs="+", help="image / video files, frame folders, or folders of them")
    p.add_argument("--model", required=True, help="a reward model folder (genalign train reward's output_dir/"
                                                  "reward_model, or a published PickScore / VideoAlign layout)")
    p.add_argument("--prompt", action="append", help="the prompt: once for every file, or repeated once per file")
    p.add_argument("--prompts", help="a prompts file (.txt one per line, .jsonl, .json): one per file, in order")
    p.add_argument("--kind", choices=["pickscore", "videoreward"], default=None,
                   help="refuse a reward folder of another kind")
    p.add_argument("--fps", type=float, default=None, help="fps of the videos (warns when far from training fps)")
    p.add_argument("--raw", action="store_true", help="raw scores (default: normalised with the stored mean/std)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the scores to this JSON file")
    return p


def score_main(argv: list[str] | None = None) -> int:
    """`genalign score FILES_OR_FOLDERS (--prompt P | --prompts FILE) --model REWARD_DIR [--json OUT]`."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return _run("genalign score", _score, score_parser().parse_args(argv))


def _eval_reward(args) -> int:
    from ..data import load_preference_pairs

    model = _load_model_or_fail(args.model, args.kind, args.batch_size)
    pairs = load_preference_pairs(args.data, tie_policy="half")
    if len(pairs) == 0:
        raise RewardCLIError(f"{args.data}: no usable preference pairs ({pairs.summary()})")
    against = (None if args.against is None
               else _load_model_or_fail(args.against, args.kind, args.batch_size, flag="--against"))
    result = evaluate_reward(model, pairs, args.dims, batch_size=args.batch_size or 32,
                             max_pairs=args.max_pairs, progress=True, against=against)
    result["model"] = str(args.model)
    if against is not None:
        result["against_model"] = str(args.against)
    paths = write_reward_report(result, args.out, f"{Path(args.model).name} on {Path(args.data).name}")
    print(format_table(result))
    print(f"report: {paths['json']}  {paths['plot']}")
    return 0


def eval_reward_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genalign eval-reward", description="Accuracy of a reward model on labelled "
                                "preference pairs, per dimension, without and with ties, next to chance and (for "
                                "data with oracle labels, like the world's) the noise-free ceiling.")
    p.add_argument("--model", required=True, help="a reward model folder")
    p.add_argument("--data", required=True, help="preference pairs: Pick-a-Pic parquet, VideoAlign CSV, jsonl, folders")
    p.add_argument("--out", required=True, help="folder for reward_eval.json and reward_eval.png")
    p.add_argument("--dims", default=None, help="comma-separated model dimensions (default: every labelled one)")
    p.add_argument("--max-pairs", type=int, default=None, help="evaluate the first N pairs only")
    p.add_argument("--kind", choices=["pickscore", "videoreward"], default=None,
                   help="refuse a reward folder of another kind")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--against", default=None, metavar="OTHER_MODEL",
                   help="another reward model folder scored on the same pairs: the difference of the two accuracies "
                        "without ties per dimension with a paired 95%% interval (and against the oracle's labels "
                        "where the data carry them)")
    return p


def eval_reward_main(argv: list[str] | None = None) -> int:
    """`genalign eval-reward --model REWARD_DIR --data PAIRS --out DIR`."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return _run("genalign eval-reward", _eval_reward, eval_reward_parser().parse_args(argv))


def _ensemble_reward(args) -> int:
    from ..rewards import EnsembleReward

    if len(args.members) < 2:
        raise RewardCLIError("an ensemble needs at least two member reward folders")
    weights = None
    if args.weights is not None:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError as e:
            raise RewardCLIError(f"--weights {args.weights!r}: not comma-separated numbers") from e
    members = [_load_model_or_fail(m, args.kind, flag=f"member {i}") for i, m in enumerate(args.members)]
    try:
        ensemble = EnsembleReward(members, weights)
    except ValueError as e:
        raise RewardCLIError(str(e)) from e
    if args.fit_data:
        from ..data import load_preference_pairs
        from ..trainers.reward import fit_normalization_on_pairs, normalization_indices

        pairs = load_preference_pairs(args.fit_data, tie_policy="half")
        indices = normalization_indices(len(pairs), args.fit_pairs, args.fit_seed)  # as `genalign train reward`
        if not indices:
            raise RewardCLIError(f"--fit-data {args.fit_data}: no usable preference pairs ({pairs.summary()})")
        fit_normalization_on_pairs(ensemble, pairs, indices)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise RewardCLIError(f"--out {str(out)!r} exists and is not empty: choose a new folder")
    tmp = out.with_name(out.name + ".tmp")  # written whole, then renamed: a stopped run leaves no half ensemble
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    ensemble.save_pretrained(tmp)
    publish_dir(tmp, out)
    norm = ", ".join(f"{d} mean {v['mean']:.4g} std {v['std']:.4g}" for d, v in ensemble.normalization.items())
    print(f"wrote {out}: the mean of {len(members)} {members[0].kind} reward models, weights "
          f"{[round(w, 4) for w in ensemble.weights]}; normalisation {norm}")
    return 0


def ensemble_reward_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genalign ensemble-reward", description="Save reward models of the same "
                                "dimensions as one ensemble folder: its scores are the weighted mean of the members' "
                                "normalised scores (genalign.rewards.EnsembleReward); load it like any reward model.")
    p.add_argument("members", nargs="+", help="two or more reward model folders")
    p.add_argument("--out", required=True, help="the new ensemble folder (must not exist or be empty)")
    p.add_argument("--weights", default=None, help="comma-separated member weights (default: equal)")
    p.add_argument("--kind", choices=["pickscore", "videoreward"], default=None,
                   help="refuse member folders of another kind")
    p.add_argument("--fit-data", default=None, metavar="PAIRS",
                   help="preference pairs whose media (A and B) set the ensemble's own normalisation (mean 0, "
                        "std 1 there); default: none (the mean of the members' normalised scores as it is)")
    p.add_argument("--fit-pairs", type=int, default=1024,
                   help="N pairs of --fit-data drawn with --fit-seed, as `genalign train reward` draws its "
                        "normalization_pairs (default 1024, as there; 0: all)")
    p.add_argument("--fit-seed", type=int, default=0, help="the seed of that draw (the trainer's seed; default 0)")
    return p


def ensemble_reward_main(argv: list[str] | None = None) -> int:
    """`genalign ensemble-reward MEMBER MEMBER ... --out DIR [--weights W,W] [--fit-data PAIRS]`."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return _run("genalign ensemble-reward", _ensemble_reward, ensemble_reward_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(eval_reward_main())
