"""Where a reward model disagrees with the world's oracle, on labelled world pairs (images or videos).

    python scripts/world_reward_errors.py MODEL_FOLDER [PAIRS.parquet] [--renders N]
    python scripts/world_reward_errors.py VIDEO_MODEL_FOLDER PAIRS.csv

PAIRS: Pick-a-Pic parquet written by `genalign world pairs --kind image` (default: the build's held-out pairs). Its
`oracle_*` columns hold the oracle's scores of both sides; the oracle's noise-free label decides a pair when their
overall scores (mean of TA and VQ) differ by at least the annotators' tie margin. Prints the model's agreement with
that label overall, by the size of the oracle's difference, by whether text alignment or only visual quality
differs, by which of text alignment's checks differ (how many of the prompt's objects are right in colour and
shape, the object count, the relation; each picture judged again here for them), and per prompt template; then
where its accuracy with ties is lost (telling the oracle's ties from the rest by the size of its differences, or
ordering the pairs). (`genalign eval-reward` gives the accuracy against the
noisy annotators.)

Then, off the generator's distribution: the share of N (default 200) clean render pairs of held-out prompts (a
prompt's render against the render of a one-attribute-swapped prompt, seed 1) that the model orders as the oracle
does. A reward fine-tuned hard on one generator's samples can forget what a clean, right picture is.

Videos (a VideoAlign CSV written by `genalign world pairs --kind video`, e.g. the build's held-out
runs/world-build/reward/video-pairs-heldout/pairs.csv): agreement of each dimension (VQ, MQ, TA) with the oracle's
noise-free label (the CSV's `oracle_*` columns), then TA by which of the oracle's text-alignment checks differ
between the two clips (colour, shape, direction, presence: the share of frames showing the object), each clip judged
again here for them.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch
from genalign.rewards import load_reward_model

from genalign.data import load_preference_pairs
from genalign.world.annotators import Annotator, overall_image_score

DEFAULT_PAIRS = "runs/world-build/latent-reward/pairs-heldout/pairs.parquet"


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    import pyarrow.parquet as pq

    renders = 200
    if "--renders" in argv:
        i = argv.index("--renders")
        renders = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    model_dir, pairs_path = argv[0], argv[1] if len(argv) > 1 else DEFAULT_PAIRS
    if pairs_path.endswith(".csv"):
        return video_errors(model_dir, pairs_path)
    rows = pq.read_table(pairs_path, columns=[c for c in pq.read_schema(pairs_path).names
                                              if c.startswith("oracle_") or c == "caption"]).to_pylist()
    pairs, model = pairs_and_model(pairs_path, rows, "oracle_TA_0", model_dir)
    with torch.no_grad():
        prompts = [p.prompt for p in pairs]
        margin = (model.score_dict([p.media_a for p in pairs], prompts, normalize=False)["score"]
                  - model.score_dict([p.media_b for p in pairs], prompts, normalize=False)["score"]).numpy()

    def overall(row, side):
        return overall_image_score({"TA": row[f"oracle_TA_{side}"], "VQ": row[f"oracle_VQ_{side}"]})

    oracle = np.array([overall(r, 0) - overall(r, 1) for r in rows])
    ta_differs = np.array([r["oracle_TA_0"] != r["oracle_TA_1"] for r in rows])
    decided = np.abs(oracle) >= Annotator().tie_margin
    agree = np.sign(margin) == np.sign(oracle)

    def line(name, mask):
        print_agreement(name, agree, mask)

    print(f"{'pairs the oracle decides':<44} {'n':>5} {'agree%':>6}")
    line("all", decided)
    for lo, hi in ((0.05, 0.1), (0.1, 0.2), (0.2, 0.4), (0.4, 1.01)):
        line(f"  overall difference in [{lo}, {hi})", decided & (np.abs(oracle) >= lo) & (np.abs(oracle) < hi))
    line("  text alignment differs", decided & ta_differs)
    line("  only visual quality differs", decided & ~ta_differs)
    from genalign.world.oracle import judge

    details = [(judge(p.media_a, p.prompt).details, judge(p.media_b, p.prompt).details) for p in pairs]
    print_check_agreement("  TA", agree, decided, details, IMAGE_TA_CHECKS)
    for word in ("left of", "above"):
        line(f"  prompts with '{word}'", decided & np.array([word in p for p in prompts]))
    line("  other prompts", decided & np.array([not any(w in p for w in ("left of", "above")) for p in prompts]))
    print_ties(margin, oracle, ~decided, np.array([p.label for p in pairs], dtype=float))
    if renders:
        agree, n = render_agreement(model, renders)
        print(f"{'clean held-out render pairs (vs swapped)':<44} {n:>5} {100 * agree:6.1f}")
    return 0


def print_ties(margin: np.ndarray, oracle: np.ndarray, tie: np.ndarray, labels: np.ndarray) -> None:
    """Where accuracy with ties is lost: in the direction of a difference or in its size. The "Ties Matter"
    accuracy against the annotators' labels calls a pair a tie when |difference| is under one threshold, so a
    model must also order the pairs by how close they are. Printed: how well |model difference| tells the
    oracle's ties from the rest (AUC: the chance that an oracle tie gets a smaller |difference| than a decided
    pair), and the accuracy with ties of the model, of the model's direction with the oracle's |difference|, and
    of the oracle's direction with the model's |difference|."""
    from scipy.stats import rankdata

    from genalign.losses.reward import accuracy_with_ties

    ranks = rankdata(-np.abs(margin))  # larger rank = smaller |difference|
    n_tie, n_decided = int(tie.sum()), int((~tie).sum())
    auc = (ranks[tie].sum() - n_tie * (n_tie + 1) / 2) / (n_tie * n_decided) if n_tie and n_decided else float("nan")
    print(f"{'oracle ties':<44} {n_tie:>5} {100 * tie.mean():6.1f}")
    print(f"{'  AUC of |model difference| for them':<44} {'':>5} {auc:6.3f}")
    for name, delta in (("with ties: the model", margin),
                        ("  its direction, the oracle's |difference|", np.sign(margin) * np.abs(oracle)),
                        ("  the oracle's direction, its |difference|", np.sign(oracle) * np.abs(margin)),
                        ("  the oracle", oracle)):
        print(f"{name:<44} {len(labels):>5} {100 * accuracy_with_ties(delta, labels)['accuracy']:6.1f}")


def pairs_and_model(pairs_path: str, rows: list[dict], oracle_column: str, model_dir: str):
    """The file's pairs (every row readable: the analysis lines them up with `rows`) and the reward model."""
    if not rows or oracle_column not in rows[0]:
        raise SystemExit(f"{pairs_path}: no oracle columns ({oracle_column}, ...): not a world pairs file")
    pairs = load_preference_pairs(pairs_path, tie_policy="half")
    if len(pairs) != len(rows):
        raise SystemExit(f"{pairs_path}: {len(pairs)} readable pairs of {len(rows)} rows; this analysis needs all")
    return pairs, load_reward_model(model_dir).eval()


def print_agreement(name: str, agree: np.ndarray, mask: np.ndarray) -> None:
    n = int(mask.sum())
    print(f"{name:<44} {n:>5} {100 * agree[mask].mean():6.1f}" if n else f"{name:<44} {n:>5}      -")


TA_CHECKS = {"colour": "color_ok", "shape": "shape_ok", "direction": "direction_ok", "presence": "presence"}
IMAGE_TA_CHECKS = {"objects": "objects_ok", "count": "count_ok", "relation": "relation_ok"}


def print_check_agreement(prefix: str, agree: np.ndarray, decided: np.ndarray, details: list[tuple[dict, dict]],
                          checks: dict[str, str]) -> dict[str, np.ndarray]:
    """Agreement on the decided pairs whose two sides differ in each of the oracle's text-alignment checks, and in
    that check alone; returns the masks. (A check neither side has, NaN, does not differ.)"""
    def differ(a, b) -> bool:
        nan_a, nan_b = isinstance(a, float) and math.isnan(a), isinstance(b, float) and math.isnan(b)
        return not (nan_a and nan_b) and (nan_a or nan_b or a != b)

    differs = {name: np.array([differ(da.get(key), db.get(key)) for da, db in details]) for name, key in checks.items()}
    for name, mask in differs.items():
        print_agreement(f"{prefix}, {name} differs", agree, decided & mask)
    for name, mask in differs.items():
        alone = mask & ~np.any([m for other, m in differs.items() if other != name], axis=0)
        print_agreement(f"{prefix}, only {name} differs", agree, decided & alone)
    return differs


def video_errors(model_dir: str, pairs_path: str) -> int:
    import csv

    from genalign.world.oracle import judge

    with open(pairs_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    pairs, model = pairs_and_model(pairs_path, rows, "oracle_TA", model_dir)
    prompts = [p.prompt for p in pairs]
    with torch.no_grad():
        scores_a = model.score_dict([p.media_a for p in pairs], prompts, normalize=False)
        scores_b = model.score_dict([p.media_b for p in pairs], prompts, normalize=False)
    print(f"{'pairs the oracle decides':<44} {'n':>5} {'agree%':>6}")
    agree = {}
    for dim in ("VQ", "MQ", "TA"):
        label = np.array([{"A": 1.0, "B": -1.0}.get(r[f"oracle_{dim}"], 0.0) for r in rows])
        agree[dim] = (np.sign((scores_a[dim] - scores_b[dim]).numpy()) == label, label != 0)
        print_agreement(dim, *agree[dim])
    ta_agree, ta_decided = agree["TA"]
    details = [(judge(p.media_a, p.prompt).details, judge(p.media_b, p.prompt).details) for p in pairs]
    differs = print_check_agreement("  TA", ta_agree, ta_decided, details, TA_CHECKS)
    # where a generated clip loses its object in some frames, which check does the model follow?
    present_more = np.array([da.get("presence", 0) > db.get("presence", 0) for da, db in details])
    model_a = (scores_a["TA"] - scores_b["TA"]).numpy() > 0
    both = ta_decided & differs["direction"] & differs["presence"]
    print_agreement("  TA, direction and presence differ", ta_agree, both)
    print_agreement("    ... the model prefers the more present", model_a == present_more, both)
    return 0


def render_agreement(model, n: int, seed: int = 1) -> tuple[float, int]:
    """(share ordered as the oracle orders them, pairs the oracle decides) on n clean render pairs."""
    import random

    from genalign.world.clip_pretrain import hard_negative_prompt
    from genalign.world.grammar import image_splits
    from genalign.world.oracle import judge_image
    from genalign.world.render import render_image, to_uint8

    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    held = image_splits().heldout
    prompts = [rng.choice(held) for _ in range(n)]
    own = [to_uint8(render_image(p, nrng)) for p in prompts]
    swapped = [to_uint8(render_image(hard_negative_prompt(p, rng), nrng)) for p in prompts]
    oracle = np.array([judge_image(a, p).TA - judge_image(b, p).TA for a, b, p in zip(own, swapped, prompts)])
    with torch.no_grad():
        margin = (model.score_dict(own, prompts, normalize=False)["score"]
                  - model.score_dict(swapped, prompts, normalize=False)["score"]).numpy()
    decided = oracle != 0
    return float((np.sign(margin[decided]) == np.sign(oracle[decided])).mean()), int(decided.sum())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
