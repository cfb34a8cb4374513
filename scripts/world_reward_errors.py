"""Where an image reward model disagrees with the world's oracle, on labelled world pairs.

    python scripts/world_reward_errors.py MODEL_FOLDER [PAIRS.parquet] [--renders N]

PAIRS: Pick-a-Pic parquet written by `genalign world pairs --kind image` (default: the build's held-out pairs). Its
`oracle_*` columns hold the oracle's scores of both sides; the oracle's noise-free label decides a pair when their
overall scores (mean of TA and VQ) differ by at least the annotators' tie margin. Prints the model's agreement with
that label overall, by the size of the oracle's difference, by whether text alignment or only visual quality
differs, and per prompt template. (`genalign eval-reward` gives the accuracy against the noisy annotators.)

Then, off the generator's distribution: the share of N (default 200) clean render pairs of held-out prompts (a
prompt's render against the render of a one-attribute-swapped prompt, seed 1) that the model orders as the oracle
does. A reward fine-tuned hard on one generator's samples can forget what a clean, right picture is.
"""

from __future__ import annotations

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
    rows = pq.read_table(pairs_path, columns=[c for c in pq.read_schema(pairs_path).names
                                              if c.startswith("oracle_") or c == "caption"]).to_pylist()
    if not rows or "oracle_TA_0" not in rows[0]:
        raise SystemExit(f"{pairs_path}: no oracle columns (oracle_TA_0, ...): not a world pairs file")
    pairs = load_preference_pairs(pairs_path, tie_policy="half")
    if len(pairs) != len(rows):
        raise SystemExit(f"{pairs_path}: {len(pairs)} readable pairs of {len(rows)} rows; this analysis needs all")
    model = load_reward_model(model_dir).eval()
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
        n = int(mask.sum())
        print(f"{name:<44} {n:>5} {100 * agree[mask].mean():6.1f}" if n else f"{name:<44} {n:>5}      -")

    print(f"{'pairs the oracle decides':<44} {'n':>5} {'agree%':>6}")
    line("all", decided)
    for lo, hi in ((0.05, 0.1), (0.1, 0.2), (0.2, 0.4), (0.4, 1.01)):
        line(f"  overall difference in [{lo}, {hi})", decided & (np.abs(oracle) >= lo) & (np.abs(oracle) < hi))
    line("  text alignment differs", decided & ta_differs)
    line("  only visual quality differs", decided & ~ta_differs)
    for word in ("left of", "above"):
        line(f"  prompts with '{word}'", decided & np.array([word in p for p in prompts]))
    line("  other prompts", decided & np.array([not any(w in p for w in ("left of", "above")) for p in prompts]))
    if renders:
        agree, n = render_agreement(model, renders)
        print(f"{'clean held-out render pairs (vs swapped)':<44} {n:>5} {100 * agree:6.1f}")
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
