"""Online preference pairs: sample K outputs per prompt from the current model, score them, keep best vs worst.

This is how on-policy Flow-DPO gets its data (ALGORITHMS.md section 1, "online pairs"): the pairs come from the
model being trained rather than from someone else's generator, and the best-vs-worst choice among K candidates
gives a far larger preference margin than a random pair (on the world's base model, K=8: oracle TA of the best
0.73 vs the worst 0.15, against 0.46 on average).

A scorer is any callable `(media uint8 [N, ...], prompts) -> scores [N]` (higher is better): the world's oracle
(`world_scorer`, what the simulated annotators see), a reward model (`reward_scorer`), or a weighted combination
(`genalign.rewards.combine_rewards`). The chosen pair then goes through the simulated annotator (its noise and
tie margin), so labels are as imperfect as the offline ones; pairs it calls a tie are written with label 0.5 and
follow the trainer's tie policy like any other data.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

Scorer = Callable[[np.ndarray, list[str]], Sequence[float]]


def world_scorer(weights: dict[str, float] | None = None) -> Scorer:
    """The world's oracle as a scorer: a weighted sum of its dimensions (default: the annotators' overall score,
    0.5 TA + 0.5 VQ for images; VQ, MQ, TA averaged for videos)."""
    from ..world.oracle import judge

    def score(media: np.ndarray, prompts: list[str]) -> list[float]:
        out = []
        for m, p in zip(media, prompts):
            j = judge(m, p).as_dict()
            w = weights or {d: 1.0 / len(j) for d in j}
            unknown = set(w) - set(j)
            if unknown:
                raise ValueError(f"world_scorer weights name {sorted(unknown)}; the oracle reports {sorted(j)}")
            out.append(sum(w[d] * j[d] for d in w))
        return out

    return score


def reward_scorer(reward_model, batch_size: int = 64) -> Scorer:
    """A genalign reward model (or `combine_rewards(...)`) as a scorer; dict outputs use their "Overall" entry."""

    @torch.no_grad()
    def score(media: np.ndarray, prompts: list[str]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(prompts), batch_size):
            s = reward_model(media[i : i + batch_size], prompts[i : i + batch_size])
            if isinstance(s, dict):
                s = s["Overall"]
            out.extend(torch.as_tensor(s).float().cpu().tolist())
        return out

    return score


def best_vs_worst(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a [prompts, K] score matrix: the index of the best and of the worst candidate (first on ties)."""
    return scores.argmax(axis=1), scores.argmin(axis=1)


def sample_online_pairs(adapter, prompts: list[str], out_dir: str | Path, *, k: int = 8, scorer: Scorer | None = None,
                        annotator=None, seed: int = 0, progress: bool = True, **sampling) -> dict:
    """Sample `k` outputs per prompt from `adapter` as it is now (LoRA included), keep best vs worst by `scorer`,
    label the pair with `annotator` (default: the world's simulated annotators) and write Pick-a-Pic parquet
    (images) or a VideoAlign CSV with MP4s (videos, labelled per dimension) under out_dir.
    Returns {"path", "num_prompts", "num_pairs", "num_ties", "margin"}."""
    from ..eval.oracle_eval import generate
    from ..world.annotators import (
        Annotator,
        label_video_pairs,
        png_bytes,
        write_pickapic_parquet,
        write_videoalign_csv,
    )

    if k < 2:
        raise ValueError(f"k={k}: online pairs need at least 2 candidates per prompt")
    if not prompts:
        raise ValueError("no prompts to sample online pairs from")
    annotator = annotator or Annotator(seed=seed)
    media, flat = generate(adapter, prompts, k, seed=seed, progress=progress, **sampling)
    is_video = media.ndim == 5
    # Default: the annotators' overall score (images 0.5 TA + 0.5 VQ; videos VQ, MQ, TA averaged).
    scorer = scorer or world_scorer(None if is_video else {"TA": 0.5, "VQ": 0.5})
    scores = np.asarray(scorer(media, flat), dtype=np.float64).reshape(len(prompts), k)
    best, worst = best_vs_worst(scores)
    margin = float(np.mean(scores.max(1) - scores.min(1)))
    if is_video:
        out_dir = Path(out_dir)
        winners = media[[i * k + b for i, b in enumerate(best)]]
        losers = media[[i * k + w for i, w in enumerate(worst)]]
        rows = label_video_pairs(winners, losers, list(prompts), annotator, out_dir)
        ties = sum(all(r[d] == "same" for d in ("VQ", "MQ", "TA")) for r in rows)
        if ties == len(rows):
            raise ValueError(f"all {len(prompts)} online pairs were ties: the scorer does not separate the candidates")
        path = out_dir / "pairs.csv"
        os.replace(write_videoalign_csv(rows, path.with_suffix(".csv.tmp")), path)
        return {"path": str(path), "num_prompts": len(prompts), "num_pairs": len(rows), "num_ties": int(ties),
                "margin": margin}
    rows, ties = [], 0
    for i, p in enumerate(prompts):
        a, b = i * k + best[i], i * k + worst[i]
        label = annotator.label(scores[i, best[i]], scores[i, worst[i]])
        ties += label == "same"
        label_0 = {"A": 1.0, "B": 0.0, "same": 0.5}[label]  # ties stay in the data: the trainer's tie_policy decides
        rows.append({"caption": p, "jpg_0": png_bytes(media[a]), "jpg_1": png_bytes(media[b]),
                     "label_0": label_0, "label_1": 1.0 - label_0,
                     "score_0": float(scores[i, best[i]]), "score_1": float(scores[i, worst[i]])})
    if ties == len(rows):
        raise ValueError(f"all {len(prompts)} online pairs were ties: the scorer does not separate the candidates")
    path = Path(out_dir) / "pairs.parquet"
    # Written whole then renamed: a run killed here never leaves a truncated table that a resume would trust.
    os.replace(write_pickapic_parquet(rows, path.with_suffix(".parquet.tmp")), path)
    return {"path": str(path), "num_prompts": len(prompts), "num_pairs": len(rows), "num_ties": int(ties),
            "margin": margin}


def draw_prompts(pool: Sequence[str], n: int, seed: int) -> list[str]:
    """n prompts drawn with replacement from pool, reproducibly."""
    rng = random.Random(seed)
    return [rng.choice(list(pool)) for _ in range(n)]


def prompt_pool(source: str, video: bool = False) -> list[str]:
    """'world': the world's training prompts (video prompts for a video model); otherwise a text file with one
    prompt per line."""
    from ..config import ConfigError

    if source == "world":
        from ..world.grammar import image_splits, video_splits

        return list((video_splits() if video else image_splits()).train)
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"config key 'online_prompts': {source!r} is neither 'world' nor a prompt file")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"config key 'online_prompts': {source} holds no prompts")
    return prompts


def scorer_from_config(name: str, video: bool = False) -> Scorer:
    if name == "world":  # the annotators' overall score
        return world_scorer(None if video else {"TA": 0.5, "VQ": 0.5})
    from ..rewards import load_reward_model

    return reward_scorer(load_reward_model(name))


def train_online(config, adapter=None):
    """Online Flow-DPO: `online_rounds` rounds of (sample online_k outputs per prompt from the current model, keep
    best vs worst, train max_steps/rounds Flow-DPO steps with the round's starting model as the reference).

    Layout: output_dir/round-{r}/pairs/pairs.parquet, output_dir/round-{r}/ (a normal Flow-DPO run folder, its
    LoRA at round-{r}/lora), and the final LoRA at output_dir/lora. Resumable at any point: finished rounds (their
    LoRA exists) are skipped, a round's pairs are reused once written, and its training resumes from its newest
    checkpoint with resume=latest."""
    import shutil

    from ..data import load_preference_pairs
    from ..models import load_adapter
    from ..world import resolve_model, sampling_defaults
    from .flow_dpo import FlowDPOTrainer

    model_path, extra, defaults = resolve_model(config.model)
    if adapter is None:
        if config.max_sequence_length:
            extra["max_sequence_length"] = config.max_sequence_length
        adapter = load_adapter(model_path, **extra)
    sampling = {k: v for k, v in (defaults or sampling_defaults(model_path)).items()
                if k in ("num_steps", "guidance_scale", "height", "width") or (k == "num_frames" and adapter.is_video)}
    pool = prompt_pool(config.online_prompts, video=adapter.is_video)
    scorer = scorer_from_config(config.online_scorer, video=adapter.is_video)
    out = Path(config.output_dir)
    steps_per_round = math.ceil(config.max_steps / config.online_rounds)
    result = None
    for r in range(config.online_rounds):
        round_dir = out / f"round-{r}"
        if (round_dir / "lora" / "pytorch_lora_weights.safetensors").is_file():
            continue  # finished before a restart
        if r > 0 and not _holds_trainable_lora(adapter):
            _load_trainable_lora(adapter, out / f"round-{r - 1}" / "lora")
        written = [f for f in (round_dir / "pairs" / "pairs.parquet", round_dir / "pairs" / "pairs.csv") if f.is_file()]
        pair_seed = config.seed + 100 * (r + 1)  # prompts, samples and annotators of round r; the trainer: seed + r
        if written:
            pairs = written[0]
        else:
            info = sample_online_pairs(adapter, draw_prompts(pool, config.online_prompts_per_round, pair_seed),
                                       round_dir / "pairs", k=config.online_k, scorer=scorer, seed=pair_seed,
                                       progress=config.progress_bar, **sampling)
            pairs = Path(info["path"])
            logger.info("round %d: %d online pairs (%d ties), mean best-worst margin %.3f", r,
                        info["num_pairs"], info["num_ties"], info["margin"])
        round_config = dataclasses.replace(
            config, output_dir=str(round_dir), data=str(pairs), online_prompts=None, seed=config.seed + r,
            max_steps=min(steps_per_round, config.max_steps - r * steps_per_round),
            reference="adapter", reference_refresh_every=0, resume="latest")
        dataset = load_preference_pairs(str(pairs), tie_policy=config.tie_policy)
        result = FlowDPOTrainer(adapter, round_config, dataset).train()
    final = out / "lora"
    if not _holds_trainable_lora(adapter):  # every round had finished before this call
        _load_trainable_lora(adapter, out / f"round-{config.online_rounds - 1}" / "lora")
    tmp = out / ".tmp-lora"
    shutil.rmtree(tmp, ignore_errors=True)
    adapter.save_lora(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if result is None:  # nothing left to train
        from .loop import TrainResult

        return TrainResult(config.max_steps, out, None, final, 0, {})
    return dataclasses.replace(result, output_dir=out, final_model_dir=final)


def _holds_trainable_lora(adapter) -> bool:
    return any(p.requires_grad for n, p in adapter.denoiser.named_parameters() if "lora_" in n)


def _load_trainable_lora(adapter, directory: Path) -> None:
    """A finished round's LoRA, loaded to be trained further (loaded adapters come frozen)."""
    adapter.load_lora(directory)
    adapter.denoiser.requires_grad_(False)
    for name, p in adapter.denoiser.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
