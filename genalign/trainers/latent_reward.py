"""Noise-aware latent reward models for Flow-NRG (ALGORITHMS.md sections 3a and 5), on the shared training loop.

The model (`genalign.guidance.LatentRewardModel`) scores a generator's *normalised latents at flow time t*,
`r_d(x_t, t, c)` for each dimension d, so that Flow-NRG can follow `grad_{x_t} R` without decoding. Two
objectives, selectable and combinable (`objective: pairs | distill | both`; `both` adds them with
`pair_weight` / `distill_weight`):

- **pairs**: preference pairs from any genalign data reader (`genalign.data.load_preference_pairs`) or a latent
  cache (`genalign cache`). Both items of a pair are encoded to the generator's normalised latents (the
  Flow-DPO trainer's `PreferenceCollator` / `pair_latents`), noised with the SAME t and the SAME noise, and
  scored; the loss is the tie-aware Bradley-Terry of VideoReward (`loss=btt`, Rao-Kupper, tie parameter `theta`)
  or plain BT (`loss=bt`). Data with per-dimension labels (VideoAlign CSV, jsonl `labels`, a cache's
  `dim_labels`) train each dimension on its own label (a dimension a pair lacks is masked out of the mean);
  data with one overall label (Pick-a-Pic) train the dimensions named in `pair_dims` (default: all) on it.
- **distill**: the per-dimension score on x_t (random t) is regressed onto a CLEAN scorer's per-dimension
  scores of the clean image, with a mean squared error. The clean scorer (`teacher`) is the world's oracle
  (per-dimension VQ / TA from the parquet's `oracle_<dim>_0/1` columns when present, else `judge` on the pixels)
  or any genalign reward model folder (`genalign.rewards.load_reward_model`, normalised scores). Targets are
  standardised per dimension over the training items (`target_norm`), so every dimension weighs the same and the
  scores have unit scale, and computed once before training.
  Why MSE and not a ranking loss: the teacher gives a value per image, not a comparison. The MSE optimum is
  `E[r_clean(x_0) | x_t]`, the expected clean reward given the noisy latent, which is exactly the noisy reward a
  guidance rule differentiates (the Flow-NRG derivation needs `log E[exp(lambda r) | x_t]`, whose first-order
  approximation for small lambda is lambda E[r | x_t]); a pairwise loss would learn the same ordering but only up
  to an arbitrary per-t offset and scale.

`noise_aware: false` is the ablation of the paper's Table 7: every latent is scored clean (t = 0), so the model
never sees noise. Timesteps for the noise-aware model: `timestep_sampling` (uniform by default: guidance
queries the reward at every sampling step, evenly spaced in t for the world's shift-1 schedule; logit-normal, the
generator's training choice, visits the ends rarely).

Text conditioning: `conditioning: cond` feeds the generator's own prompt encoding (`cond_key`, pooled by
default) through the model's FiLM layers (`LatentRewardModel`), which text alignment needs; `none` scores the
latent alone. The trunk is a small conv net (`trunk: conv`), an MLP, or the first `num_blocks` blocks of the
generator's transformer (`trunk: transformer`, weights copied).

The final model is `output_dir/latent_reward/` (`LatentRewardModel.save_pretrained`, also inside every
checkpoint), usable as `genalign sample --nrg-reward output_dir/latent_reward`. With `eval_data`, the final
model's held-out pairwise accuracy per dimension at each of `eval_timesteps` is written to
`output_dir/eval/latent_reward_eval.json`: against the data's labels and, where oracle scores exist (the world),
against the oracle's per-dimension preference.

    genalign train latent-reward --config latent_reward_world data=PAIRS.parquet [key=value ...]
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import flow
from ..config import ConfigError, load_config
from .flow_dpo import TIE_POLICIES, PreferenceCollator, pair_latents
from .loop import (
    TrainConfig,
    Trainer,
    TrainResult,
    eval_mode,
    option,
    to_device,
)

logger = logging.getLogger("genalign.trainers")

OBJECTIVES = ("pairs", "distill", "both")
LOSSES = ("btt", "bt")
TIMESTEP_SAMPLERS = ("logit_normal", "uniform")
TRUNKS = ("conv", "mlp", "transformer")
CONDITIONING = ("cond", "none")
TARGET_NORMS = ("standardize", "none")
ORACLE_TEACHERS = ("auto", "columns", "oracle")


@dataclass
class LatentRewardTrainConfig(TrainConfig):
    output_dir: str = option("runs/latent-reward", "run folder: checkpoints, metrics.jsonl, config.yaml, "
                                                  "latent_reward/, eval/")
    model: str = option("world", "the generator whose latents are scored: a diffusers pipeline folder or cached "
                                 "hub id; 'world' / 'world-video': the built-in world's base models")
    data: str | None = option(None, "training pairs (Pick-a-Pic parquet, VideoAlign CSV, jsonl, folder layout) or "
                                    "a latent cache folder made by `genalign cache` with this model")
    eval_data: str | None = option(None, "held-out pairs: accuracy per dimension at eval_timesteps at the end")
    eval_timesteps: tuple[float, ...] = option((0.0, 0.25, 0.5, 0.75), "flow times t of the held-out evaluation")
    eval_max_pairs: int = option(0, "evaluate on the first N held-out pairs only (0: all)")
    eval_tie_margin: float = option(0.05, "oracle scores closer than this are an oracle tie (the world's "
                                          "annotators' margin); those pairs are left out of the oracle accuracy")
    resolution: int | None = option(None, "resize + centre-crop media to this square size (None: as they are)")
    num_frames: int | None = option(None, "videos: sample this many frames uniformly (None: all)")
    max_sequence_length: int | None = option(None, "text tokens for a T5-type encoder (None: the model's default)")
    preload: bool = option(False, "encode every training pair's latents once into memory before training (small "
                                  "data such as the world's; a latent cache does the same on disk)")
    # what is learned
    dims: tuple[str, ...] = option(("VQ", "TA"), "the reward dimensions (one head each), e.g. VQ,MQ,TA or Overall")
    objective: str = option("pairs", "pairs (BTT / BT on preference pairs) | distill (MSE onto a clean scorer's "
                                     "per-dimension scores) | both (pair_weight * pairs + distill_weight * distill)")
    pair_dims: tuple[str, ...] | None = option(None, "data with ONE overall label: the dimensions it trains (None: "
                                                     "all dims); per-dimension labels always train their own dim")
    loss: str = option("btt", "pairs loss: btt (Bradley-Terry with ties, Rao-Kupper) | bt (plain; a tie is the "
                              "symmetric soft label)")
    theta: float = option(5.0, "BTT tie parameter (> 1; VideoReward uses 5)")
    tie_policy: str = option("half", "ties of the overall label: half (kept: ties are signal for a reward model) | "
                                     "drop | keep_first (as A wins; biased)")
    teacher: str = option("auto", "distill targets: auto (the data's oracle_<dim>_0/1 columns, else the world's "
                                  "oracle on the pixels) | columns | oracle | a genalign reward model folder")
    target_norm: str = option("standardize", "distill targets: standardize (per dimension over the training "
                                             "items; stored with the model) | none")
    pair_weight: float = option(1.0, "objective=both: weight of the pairs loss")
    distill_weight: float = option(1.0, "objective=both: weight of the distill loss")
    noise_aware: bool = option(True, "true: score x_t at a random t (the model Flow-NRG needs); false: clean "
                                     "latents only, t = 0 (the ablation of the paper's Table 7)")
    timestep_sampling: str = option("uniform", "uniform (default; guidance visits all of t) | logit_normal")
    logit_mean: float = option(0.0, "mean of the logit-normal timestep distribution")
    logit_std: float = option(1.0, "std of the logit-normal timestep distribution")
    # the network
    trunk: str = option("conv", "conv (small FiLM conv net) | mlp | transformer (the generator's first blocks)")
    hidden: int = option(64, "conv / mlp width (transformer trunk: the width of the head's hidden layer)")
    depth: int = option(3, "conv blocks (each halves the resolution) / mlp layers")
    time_dim: int = option(64, "size of the sinusoidal t embedding")
    num_blocks: int = option(2, "trunk=transformer: how many of the generator's first blocks (weights copied)")
    conditioning: str = option("cond", "cond (the generator's prompt encoding, `cond_key`) | none")
    cond_key: str = option("pooled_prompt_embeds", "which entry of the generator's prompt encoding conditions "
                                                   "the conv / mlp trunk (token embeddings are mean-pooled)")
    init_from: str | None = option(None, "continue from a latent reward folder (same latent space and dims)")

    def __post_init__(self):
        super().__post_init__()

        def bad(key, msg):
            raise ConfigError(f"config key {key!r}: {msg}")

        choices = {"objective": OBJECTIVES, "loss": LOSSES, "tie_policy": TIE_POLICIES,
                   "timestep_sampling": TIMESTEP_SAMPLERS, "trunk": TRUNKS, "conditioning": CONDITIONING,
                   "target_norm": TARGET_NORMS}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                bad(key, f"must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        self.dims = tuple(str(d) for d in self.dims)
        if not self.dims or len(set(self.dims)) != len(self.dims):
            bad("dims", f"must be distinct dimension names, got {self.dims!r}")
        if self.pair_dims is not None:
            self.pair_dims = tuple(str(d) for d in self.pair_dims)
            unknown = [d for d in self.pair_dims if d not in self.dims]
            if unknown or not self.pair_dims:
                bad("pair_dims", f"must name some of dims {list(self.dims)}, got {list(self.pair_dims)}")
        if not self.theta > 1:
            bad("theta", f"must be > 1, got {self.theta}")
        for key in ("pair_weight", "distill_weight"):
            v = getattr(self, key)
            if not (math.isfinite(v) and v >= 0):
                bad(key, f"must be finite and >= 0, got {v}")
        if self.objective == "both" and self.pair_weight == 0 and self.distill_weight == 0:
            bad("pair_weight", "objective=both needs pair_weight or distill_weight > 0")
        if self.logit_std <= 0:
            bad("logit_std", f"must be > 0, got {self.logit_std}")
        self.eval_timesteps = tuple(float(t) for t in self.eval_timesteps)
        if not self.eval_timesteps or any(not 0 <= t < 1 for t in self.eval_timesteps):
            bad("eval_timesteps", f"must be flow times in [0, 1), got {self.eval_timesteps}")
        for key in ("hidden", "time_dim"):
            if getattr(self, key) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        if self.depth < 1 and self.trunk != "transformer":
            bad("depth", f"must be >= 1, got {self.depth}")
        if self.trunk == "transformer" and self.num_blocks < 1:
            bad("num_blocks", f"trunk=transformer needs num_blocks >= 1, got {self.num_blocks}")
        if self.eval_max_pairs < 0:
            bad("eval_max_pairs", f"must be >= 0, got {self.eval_max_pairs}")
        if self.eval_tie_margin < 0:
            bad("eval_tie_margin", f"must be >= 0, got {self.eval_tie_margin}")

    @property
    def uses_pairs(self) -> bool:
        return self.objective in ("pairs", "both")

    @property
    def uses_distill(self) -> bool:
        return self.objective in ("distill", "both")


# ------------------------------------------------------------------------------------------------ labels
def pair_label_row(label: float, labels: Mapping[str, float] | None, dims: Sequence[str],
                   pair_dims: Sequence[str] | None) -> list[float]:
    """One pair's label per model dimension (NaN = not trained on this pair).

    Per-dimension labels (VideoAlign / jsonl / a cache's dim_labels) label their own dimension only; without
    any, the overall label labels the dimensions in `pair_dims` (None: all)."""
    nan = float("nan")
    if labels:
        return [float(labels[d]) if d in labels and labels[d] is not None else nan for d in dims]
    trained = set(dims if pair_dims is None else pair_dims)
    return [float(label) if d in trained else nan for d in dims]


def _item_dict(item) -> dict[str, Any]:
    """A PreferencePair or a cache-style dict -> a dict (media or latents, prompt, label, labels, meta)."""
    if isinstance(item, dict):
        return item
    return {"prompt": item.prompt, "media_a": item.media_a, "media_b": item.media_b, "label": item.label,
            "labels": item.labels, "meta": item.meta}


class LatentRewardPairs(torch.utils.data.Dataset):
    """Training items for the latent reward: the pairs of `base` with labels per model dimension and (for the
    distill objective) the teacher's per-dimension targets of A and B.

    base: a `PreferenceDataset`, a latent cache (`load_cache`), or a list of dicts with `latents_a` / `latents_b`
    (or `media_a` / `media_b`), `prompt`, `label` and optionally `labels` ({dim: 1 / 0 / 0.5}). Items are the
    dicts `PreferenceCollator` reads, plus `reward_labels` (D,) and `targets` (2, D) (NaN: none)."""

    def __init__(self, base, dims: Sequence[str], pair_dims: Sequence[str] | None = None,
                 targets: torch.Tensor | None = None):
        self.base = base
        self.dims = tuple(dims)
        self.pair_dims = None if pair_dims is None else tuple(pair_dims)
        if targets is not None and tuple(targets.shape) != (len(base), 2, len(self.dims)):
            raise ValueError(f"targets must have shape ({len(base)}, 2, {len(self.dims)}), got {tuple(targets.shape)}")
        self.targets = targets
        self.cache_dims = list(getattr(base, "dims", None) or []) if hasattr(base, "manifest") else []

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(_item_dict(self.base[i]))
        labels = item.pop("labels", None)
        if labels is None and "dim_labels" in item and self.cache_dims:  # a latent cache's per-dimension labels
            values = item["dim_labels"].tolist()
            labels = {d: v for d, v in zip(self.cache_dims, values) if not math.isnan(v)}
        item.pop("dim_labels", None)
        item["reward_labels"] = torch.tensor(pair_label_row(float(item["label"]), labels, self.dims, self.pair_dims),
                                             dtype=torch.float32)
        if self.targets is not None:
            item["targets"] = self.targets[i]
        else:
            item["targets"] = torch.full((2, len(self.dims)), float("nan"))
        item.pop("meta", None)
        return item


class LatentRewardCollator(PreferenceCollator):
    """The Flow-DPO trainer's `PreferenceCollator` (pixels in [-1, 1] or cached latents, prompts, labels) plus
    `reward_labels` (B, D) and `targets` (B, 2, D)."""

    def __call__(self, items: list) -> dict[str, Any]:
        batch = super().__call__(items)
        batch["reward_labels"] = torch.stack([it["reward_labels"] for it in items])
        batch["targets"] = torch.stack([it["targets"] for it in items])
        return batch


# ------------------------------------------------------------------------------------------------ teachers
def _records_meta(dataset) -> list[dict] | None:
    """The meta of every pair without decoding media (a PreferenceDataset's records, or dicts' `meta`)."""
    if hasattr(dataset, "records"):
        return [r.meta or {} for r in dataset.records]
    if isinstance(dataset, list) and dataset and isinstance(dataset[0], dict):
        return [d.get("meta") or {} for d in dataset]
    return None


def oracle_column_scores(dataset, dims: Sequence[str]) -> torch.Tensor | None:
    """(N, 2, D) oracle scores from the pairs' `oracle_<dim>_0` / `oracle_<dim>_1` columns (the world's
    `genalign world pairs` writes them); None when any pair lacks one."""
    metas = _records_meta(dataset)
    if not metas:
        return None
    out = torch.empty(len(metas), 2, len(dims), dtype=torch.float64)
    for i, meta in enumerate(metas):
        for j, d in enumerate(dims):
            for side in (0, 1):
                v = meta.get(f"oracle_{d}_{side}")
                if v is None:
                    return None
                out[i, side, j] = float(v)
    return out


def _iter_pair_media(dataset, adapter=None, batch_size: int = 64):
    """(media A list, media B list, prompts) per chunk, uint8; latent items are decoded with the adapter."""
    from ..sampling import latents_to_uint8

    for start in range(0, len(dataset), batch_size):
        items = [_item_dict(dataset[i]) for i in range(start, min(len(dataset), start + batch_size))]
        prompts = [it["prompt"] for it in items]
        if "media_a" in items[0]:
            yield [it["media_a"] for it in items], [it["media_b"] for it in items], prompts
        else:
            if adapter is None:
                raise ConfigError("scoring latent items with a clean teacher needs the generator to decode them")
            lat = torch.cat([torch.stack([it["latents_a"] for it in items]), torch.stack([it["latents_b"] for it in items])])
            pix = latents_to_uint8(adapter, lat.to(adapter.device, adapter.dtype))
            yield list(pix[: len(items)]), list(pix[len(items):]), prompts


def oracle_judge_scores(dataset, dims: Sequence[str], adapter=None, progress: bool = True) -> torch.Tensor:
    """(N, 2, D) scores of the world's oracle (`genalign.world.oracle.judge`) on the pairs' pixels."""
    from tqdm.auto import tqdm

    from ..world.grammar import PromptError
    from ..world.oracle import judge

    rows = []
    bar = tqdm(total=len(dataset), desc="oracle targets", disable=not progress or len(dataset) < 256, mininterval=2)
    for media_a, media_b, prompts in _iter_pair_media(dataset, adapter):
        for a, b, p in zip(media_a, media_b, prompts):
            try:
                ja, jb = judge(np.asarray(a), p).as_dict(), judge(np.asarray(b), p).as_dict()
            except PromptError as e:
                raise ConfigError(f"teacher=oracle: the world's oracle reads only the world's prompt language ({e}); "
                                  "give a reward model folder as teacher") from None
            missing = [d for d in dims if d not in ja]
            if missing:
                raise ConfigError(f"teacher=oracle: the oracle has no dimension(s) {missing} here (it gives "
                                  f"{sorted(ja)})")
            rows.append([[ja[d] for d in dims], [jb[d] for d in dims]])
        bar.update(len(prompts))
    bar.close()
    return torch.tensor(rows, dtype=torch.float64)


def reward_model_scores(dataset, dims: Sequence[str], reward_dir: str, adapter=None, batch_size: int = 64) -> torch.Tensor:
    """(N, 2, D) normalised scores of a genalign reward model (`load_reward_model`). Its dimensions are matched
    by name; a one-dimensional reward (e.g. a CLIP reward's "score") serves a one-dimensional latent reward."""
    from ..rewards import load_reward_model

    reward = load_reward_model(reward_dir).eval()
    names = tuple(reward.output_dimensions)
    if len(dims) == 1 and len(reward.dimensions) == 1:
        mapping = {dims[0]: reward.dimensions[0]}
    else:
        missing = [d for d in dims if d not in names]
        if missing:
            raise ConfigError(f"config key 'teacher': the reward model {reward_dir!r} has dimensions {list(names)}, "
                              f"not {missing}")
        mapping = {d: d for d in dims}
    rows = []
    for media_a, media_b, prompts in _iter_pair_media(dataset, adapter, batch_size):
        scores = reward(list(media_a) + list(media_b), prompts + prompts)
        if not isinstance(scores, Mapping):
            scores = {reward.dimensions[0]: scores}
        n = len(prompts)
        per = torch.stack([scores[mapping[d]].detach().double().cpu() for d in dims], dim=1)  # (2n, D)
        rows.append(torch.stack([per[:n], per[n:]], dim=1))
    return torch.cat(rows)


def teacher_scores(teacher: str, dataset, dims: Sequence[str], adapter=None) -> tuple[torch.Tensor, str]:
    """The clean scorer's (N, 2, D) per-dimension scores of both items of every pair, and what gave them."""
    if teacher in ("auto", "columns"):
        cols = oracle_column_scores(dataset, dims)
        if cols is not None:
            return cols, "oracle columns"
        if teacher == "columns":
            raise ConfigError(f"config key 'teacher': teacher=columns needs oracle_<dim>_0 / oracle_<dim>_1 columns "
                              f"for every dimension {list(dims)} in the data (the world's pairs have them)")
        return oracle_judge_scores(dataset, dims, adapter), "oracle judge"
    if teacher == "oracle":
        return oracle_judge_scores(dataset, dims, adapter), "oracle judge"
    if not Path(teacher).is_dir():
        raise ConfigError(f"config key 'teacher': {teacher!r} is none of {', '.join(ORACLE_TEACHERS)} and no folder")
    return reward_model_scores(dataset, dims, teacher, adapter), f"reward model {teacher}"


def standardize_targets(scores: torch.Tensor, dims: Sequence[str], mode: str
                        ) -> tuple[torch.Tensor, dict[str, dict[str, float]]]:
    """(N, 2, D) -> float32 targets and the per-dimension {mean, std} used (over both items of every pair)."""
    stats = {}
    out = scores.clone().double()
    for j, d in enumerate(dims):
        x = out[:, :, j]
        finite = x[torch.isfinite(x)]
        if mode == "standardize" and finite.numel() > 1:
            mean, std = float(finite.mean()), float(finite.std(unbiased=False))
            std = std if std > 1e-8 else 1.0
        else:
            mean, std = 0.0, 1.0
        out[:, :, j] = (x - mean) / std
        stats[d] = {"mean": mean, "std": std}
    return out.float(), stats


# ------------------------------------------------------------------------------------------------ preloading
@torch.no_grad()
def encode_pairs(adapter, dataset, resolution: int | None = None, num_frames: int | None = None,
                 batch_size: int = 64, progress: bool = True) -> list[dict[str, Any]]:
    """Every pair's latents, encoded once: dicts with `latents_a`, `latents_b`, `prompt`, `label`, `labels`,
    `meta` (what `PreferenceCollator` reads as cached items)."""
    from tqdm.auto import tqdm

    collate = PreferenceCollator(resolution, num_frames)
    out = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="encoding pairs", disable=not progress, mininterval=2):
        items = [_item_dict(dataset[i]) for i in range(start, min(len(dataset), start + batch_size))]
        if "latents_a" in items[0]:
            out.extend(items)
            continue
        lat_a, lat_b = pair_latents(adapter, collate(items))
        for it, a, b in zip(items, lat_a.cpu(), lat_b.cpu()):
            out.append({"latents_a": a.clone(), "latents_b": b.clone(), "prompt": it["prompt"],
                        "label": float(it["label"]), "labels": it.get("labels"), "meta": it.get("meta") or {}})
    return out


def latent_shape_of(adapter, item, resolution: int | None, num_frames: int | None) -> tuple[int, ...]:
    """One latent's shape for a dataset item (cached latents, or the media's size after the resize)."""
    item = _item_dict(item)
    if "latents_a" in item:
        return tuple(item["latents_a"].shape)
    media = np.asarray(item["media_a"])
    h, w = (resolution, resolution) if resolution else media.shape[-3:-1]
    frames = None
    if media.ndim == 4:
        frames = num_frames or media.shape[0]
    return tuple(adapter.latent_shape(int(h), int(w), frames))


# ------------------------------------------------------------------------------------------------ model
def build_latent_reward_model(config: LatentRewardTrainConfig, adapter, latent_shape: Sequence[int],
                              sample_cond: dict[str, torch.Tensor] | None = None):
    """The `LatentRewardModel` a config asks for, in `adapter`'s latent space (seeded with config.seed).
    `sample_cond`: one item's prompt encoding from a latent cache, read for its width instead of running the text
    encoders (which may have been released)."""
    from ..guidance.latent_reward import LatentRewardConfig, LatentRewardModel, latent_space_id

    space = latent_space_id(adapter)
    if config.init_from:
        model = LatentRewardModel.from_pretrained(config.init_from, latent_space=space, latent_shape=latent_shape)
        if tuple(model.dims) != tuple(config.dims):
            raise ConfigError(f"config key 'init_from': {config.init_from!r} has dims {list(model.dims)}, the config "
                              f"asks for {list(config.dims)}")
        return model.train()
    torch.manual_seed(config.seed)
    if config.trunk == "transformer":
        return LatentRewardModel.from_transformer(adapter.denoiser, config.num_blocks, dims=config.dims,
                                                  latent_space=space, latent_shape=latent_shape,
                                                  hidden=config.hidden).float().train()
    cond_dim = 0
    if config.conditioning == "cond":
        enc = sample_cond if sample_cond is not None else adapter.encode_prompt([""])
        if config.cond_key not in enc:
            raise ConfigError(f"config key 'cond_key': the generator's prompt encoding has {sorted(enc)}, not "
                              f"{config.cond_key!r}")
        cond_dim = int(enc[config.cond_key].shape[-1])
    cfg = LatentRewardConfig(dims=config.dims, latent_space=space, latent_shape=tuple(latent_shape),
                             trunk=config.trunk, hidden=config.hidden, depth=config.depth, time_dim=config.time_dim,
                             cond_key=config.cond_key if cond_dim else None, cond_dim=cond_dim)
    return LatentRewardModel(cfg).train()


def build_model_for(config: LatentRewardTrainConfig, adapter, dataset: LatentRewardPairs):
    """The config's model at the dataset's latent shape (its text width from a cached item when there is one)."""
    item = _item_dict(dataset[0])
    return build_latent_reward_model(config, adapter, latent_shape_of(adapter, item, config.resolution,
                                                                      config.num_frames), item.get("cond"))


# ------------------------------------------------------------------------------------------------ trainer
class LatentRewardTrainer(Trainer):
    """Trains a `LatentRewardModel` on `adapter`'s latents (the generator itself stays frozen).

    dataset: a `LatentRewardPairs` (or anything it wraps: pairs, a latent cache, dicts of latents). With the
    distill objective its `targets` must be set (`from_config` computes them from `teacher`).
    model: the latent reward model (None: built from the config at the dataset's latent shape).
    """

    config_class = LatentRewardTrainConfig
    model_subdir = "latent_reward"  # LatentRewardModel.save_pretrained: --nrg-reward output_dir/latent_reward

    def __init__(self, adapter, config: LatentRewardTrainConfig, dataset, model=None, eval_dataset=None):
        if not isinstance(config, LatentRewardTrainConfig):
            raise TypeError(f"config must be a LatentRewardTrainConfig, got {type(config).__name__}")
        if not isinstance(dataset, LatentRewardPairs):
            dataset = LatentRewardPairs(dataset, config.dims, config.pair_dims)
        if tuple(dataset.dims) != tuple(config.dims):
            raise ConfigError(f"the dataset's dims {list(dataset.dims)} differ from config dims {list(config.dims)}")
        if config.uses_distill and dataset.targets is None:
            raise ConfigError(f"objective={config.objective} needs the teacher's targets on the dataset "
                              "(LatentRewardTrainer.from_config computes them from `teacher`)")
        if len(dataset) == 0:
            raise ConfigError("config key 'data': no usable pairs")
        self.adapter = adapter
        if model is None:
            model = build_model_for(config, adapter, dataset)
        if tuple(model.dims) != tuple(config.dims):
            raise ConfigError(f"the model's dims {list(model.dims)} differ from config dims {list(config.dims)}")
        self.eval_dataset = eval_dataset
        self.eval_result: dict[str, Any] | None = None
        self.last_timesteps: torch.Tensor | None = None  # the t of the last micro-batch (tests, diagnostics)
        super().__init__(config, model=model, train_dataset=dataset,
                         collate_fn=LatentRewardCollator(config.resolution, config.num_frames))
        # saved with the model (genalign_latent_reward.json): how it was trained
        model.config.extra["training"] = {
            "objective": config.objective, "noise_aware": config.noise_aware, "dims": list(config.dims),
            "timestep_sampling": config.timestep_sampling if config.noise_aware else "none (t = 0)"}

    # ------------------------------------------------------------------------------------- setup
    def prepare_model(self) -> None:
        adapter = self.adapter
        for module in [adapter.denoiser, *adapter.text_encoders(), getattr(adapter.pipe, "vae", None)]:
            if module is not None:
                module.requires_grad_(False).eval()
        adapter.to(self.device)
        if self.weight_dtype != torch.float32:
            for module in [adapter.denoiser, *adapter.text_encoders(), getattr(adapter.pipe, "vae", None)]:
                if module is not None:
                    module.to(self.weight_dtype)
        self.model.to(self.device)

    def save_model(self, directory: Path) -> None:
        self.model.save_pretrained(directory)

    # ------------------------------------------------------------------------------------- the loss
    def sample_t(self, n: int) -> torch.Tensor:
        """Flow times of one micro-batch (drawn from the trainer's generator; all 0 when noise_aware=false)."""
        cfg = self.config
        kw = {"mean": cfg.logit_mean, "std": cfg.logit_std} if cfg.timestep_sampling == "logit_normal" else {}
        t = flow.sample_timesteps(n, cfg.timestep_sampling, generator=self.generator, device=self.device, **kw)
        return t if cfg.noise_aware else torch.zeros_like(t)

    def _cond(self, batch: dict[str, Any]):
        if getattr(self.model, "conditioning", "none") != "cond":
            return None
        if "cond" in batch:
            return {k: v.to(self.device).float() for k, v in batch["cond"].items()}
        with torch.no_grad():
            return {k: v.float() for k, v in self.adapter.encode_prompt(list(batch["prompt"])).items()}

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg = self.config
        lat_a, lat_b = pair_latents(self.adapter, batch, self.device)
        n = lat_a.shape[0]
        # noise first, then t: the generator advances the same way whatever the objective or noise_aware
        eps = torch.randn(lat_a.shape, generator=self.generator, device=self.device, dtype=torch.float32)
        t = self.sample_t(n)
        self.last_timesteps = t.detach()
        x_t = torch.cat([flow.interpolate(lat_a, eps, t), flow.interpolate(lat_b, eps, t)])
        cond = self._cond(batch)
        cond2 = None if cond is None else {k: torch.cat([v, v]) for k, v in cond.items()}
        scores = self.model(x_t, torch.cat([t, t]), cond2)
        s = torch.stack([scores[d] for d in cfg.dims], dim=1).float()  # (2n, D)
        return latent_reward_loss(s[:n], s[n:], batch["reward_labels"].to(self.device),
                                  batch["targets"].to(self.device), cfg, t)

    def nonfinite_hint(self) -> str:
        return "the reward heads' outputs overflowed (lower lr) or the teacher's targets hold inf values"

    # ------------------------------------------------------------------------------------- train + eval
    def train(self, stop_at_step: int | None = None) -> TrainResult:
        result = super().train(stop_at_step)
        if result.final_model_dir is not None and self.eval_dataset is not None and self.is_main:
            self.eval_result = self.evaluate(self.eval_dataset, self.output_dir / "eval")
        return result

    def evaluate(self, dataset, out_dir: Path | None = None) -> dict[str, Any]:
        """Held-out accuracy per dimension at each of `eval_timesteps` (`evaluate_latent_reward`)."""
        cfg = self.config
        with eval_mode(self.model):
            result = evaluate_latent_reward(self.model, self.adapter, dataset, cfg.eval_timesteps,
                                            resolution=cfg.resolution, num_frames=cfg.num_frames,
                                            max_pairs=cfg.eval_max_pairs or None, tie_margin=cfg.eval_tie_margin,
                                            pair_dims=cfg.pair_dims, seed=cfg.seed)
        result["step"] = self.state.step
        if out_dir is not None:
            out_dir = Path(out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "latent_reward_eval.json").write_text(json.dumps(result, indent=2))
            record: dict[str, Any] = {"step": self.state.step}
            for d, per_t in result["accuracy"].items():
                for t, m in per_t.items():
                    for k in ("labels", "oracle", "oracle_independent"):
                        if m.get(k) is not None:
                            record[f"eval/{d}/t={t}/{k}"] = m[k]
            with open(self.output_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
            logger.info("held-out evaluation (%d pairs):\n%s", result["pairs"], format_eval_table(result))
        return result

    # ------------------------------------------------------------------------------------- from a config
    @classmethod
    def from_config(cls, config: LatentRewardTrainConfig) -> LatentRewardTrainer:
        """Load the generator (`model`), the pairs (`data`, `eval_data`), compute the distill targets, build."""
        from ..models import load_adapter
        from ..world import resolve_model

        if not config.data:
            raise ConfigError("config key 'data': give the training pairs or a latent cache folder (data=PATH)")
        model_path, extra, _ = resolve_model(config.model)
        if config.max_sequence_length:
            extra["max_sequence_length"] = config.max_sequence_length
        from ..data.cache import holds_prompt_embeddings

        # Every prompt's encoding in caches (not re-encoded by preload): the text encoders are built empty and
        # never read (see FlowDPOTrainer.from_config); released below once the caches are checked.
        cached = not config.preload and all(holds_prompt_embeddings(d) for d in (config.data, config.eval_data) if d)
        adapter = load_adapter(model_path, text_encoders="empty" if cached else "load", **extra)
        adapter.denoiser.requires_grad_(False)
        base = load_pairs(config.data, adapter, config)
        if config.preload:
            base = encode_pairs(adapter, base, config.resolution, config.num_frames)
        targets = None
        if config.uses_distill:
            scores, source = teacher_scores(config.teacher, base, config.dims, adapter)
            targets, stats = standardize_targets(scores, config.dims, config.target_norm)
            logger.info("distill targets from %s: %s", source,
                        ", ".join(f"{d} mean {s['mean']:.4g} std {s['std']:.4g}" for d, s in stats.items()))
        dataset = LatentRewardPairs(base, config.dims, config.pair_dims, targets)
        eval_dataset = None
        if config.eval_data:
            eval_dataset = load_pairs(config.eval_data, adapter, config, tie_policy="half")
        model = build_model_for(config, adapter, dataset)
        if cached or model.conditioning != "cond":
            # No prompt will be encoded (every prompt's embedding is in the caches, or the model reads no text): the
            # text encoders would only take memory, on the accelerator too (SD3.5's: 10 GiB in bf16).
            freed = adapter.release_text_encoders()
            logger.info("the generator's text encoders are not needed: released (%.1f M parameters)", freed / 1e6)
        trainer = cls(adapter, config, dataset, model=model, eval_dataset=eval_dataset)
        if targets is not None:
            trainer.model.config.extra["distill_targets"] = {"source": source, "normalization": stats}
        trainer.model.config.extra["training"]["data"] = str(config.data)
        return trainer


def latent_reward_loss(ra: torch.Tensor, rb: torch.Tensor, reward_labels: torch.Tensor, targets: torch.Tensor,
                       cfg: LatentRewardTrainConfig, t: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The configured objective on scores of A and B (n, D): pairs (BTT / BT on `reward_labels` (n, D), NaN
    masked), distill (masked MSE of [ra; rb] onto `targets` (n, 2, D)), or their weighted sum."""
    from ..losses.reward import bt_loss, btt_loss

    metrics: dict[str, Any] = {}
    total = ra.new_zeros(())
    if cfg.uses_pairs:
        if cfg.loss == "btt":
            pl, st = btt_loss(ra, rb, reward_labels, theta=cfg.theta)
        else:
            pl, st = bt_loss(ra, rb, reward_labels)
        total = total + (cfg.pair_weight if cfg.objective == "both" else 1.0) * pl
        metrics.update({"pairs/loss": pl.detach(), "pairs/accuracy": st["accuracy"],
                        "pairs/margin": st["margin_mean"], "pairs/num_valid": st["num_valid"].float()})
        with torch.no_grad():
            delta = ra - rb
            for j, d in enumerate(cfg.dims):
                y = reward_labels[:, j]
                decided = (y == 1) | (y == 0)
                right = ((delta[:, j] > 0) == (y == 1))[decided].float()
                # every key on every step (processes average the same keys): NaN when no pair decides d
                metrics[f"pairs/accuracy/{d}"] = right.mean() if decided.any() else float("nan")
    if cfg.uses_distill:
        pred = torch.stack([ra, rb], dim=1)  # (n, 2, D)
        valid = torch.isfinite(targets)
        err = torch.where(valid, pred - torch.where(valid, targets, torch.zeros_like(targets)), torch.zeros_like(pred))
        dl = (err ** 2).sum() / valid.sum().clamp(min=1)
        total = total + (cfg.distill_weight if cfg.objective == "both" else 1.0) * dl
        metrics["distill/mse"] = dl.detach()
        with torch.no_grad():
            for j, d in enumerate(cfg.dims):
                v = valid[:, :, j]
                metrics[f"distill/mse/{d}"] = (err[:, :, j][v] ** 2).mean() if v.any() else float("nan")
    if t is not None:
        metrics["t_mean"] = t.float().mean().detach()
    return total, metrics


# ------------------------------------------------------------------------------------------------ data
def load_pairs(data: str, adapter, config: LatentRewardTrainConfig, tie_policy: str | None = None):
    """A latent cache folder (checked against the generator) or any preference data genalign reads."""
    from ..data import load_cache, load_preference_pairs

    if (Path(data) / "manifest.json").is_file():
        return load_cache(data, adapter=adapter, resolution=config.resolution, num_frames=config.num_frames)
    ds = load_preference_pairs(data, tie_policy=tie_policy or config.tie_policy)
    if len(ds) == 0:
        raise ConfigError(f"{data!r} holds no usable pairs ({ds.summary()})")
    return ds


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate_latent_reward(model, adapter, dataset, timesteps: Sequence[float] = (0.0, 0.25, 0.5, 0.75), *,
                           resolution: int | None = None, num_frames: int | None = None,
                           max_pairs: int | None = None, tie_margin: float = 0.05, pair_dims=None,
                           oracle_scores: torch.Tensor | None = None, seed: int = 0, batch_size: int = 128,
                           progress: bool = False) -> dict[str, Any]:
    """Pairwise accuracy of a latent reward on held-out pairs, per dimension, at each flow time t.

    Both items of a pair are noised with the same t and the same noise, as in training (one seeded draw per
    pair, the same for every t, so only t changes between columns); the `*_independent` entries noise B with
    its own draw instead, as two separate samples would be at that t (for a score that is linear in x_t,
    shared noise cancels out of the comparison; independent noise does not). Per dimension and t:
    - `labels`: accuracy without ties against the data's labels (per-dimension labels where the data has them,
      else the overall label, for the dims in `pair_dims`), and `labels_with_ties` (tie-calibrated);
    - `oracle`: accuracy against the oracle's per-dimension preference (A better by at least `tie_margin`),
      from `oracle_scores` (N, 2, D) or the data's `oracle_<dim>_0/1` columns; None without oracle scores.
    """
    from ..losses.reward import accuracy_with_ties, accuracy_without_ties

    dims = tuple(model.dims)
    n_total = len(dataset) if not max_pairs else min(len(dataset), max_pairs)
    if oracle_scores is None:
        oracle_scores = oracle_column_scores(dataset, dims)
    pairs = LatentRewardPairs(dataset, dims, pair_dims)
    collate = LatentRewardCollator(resolution, num_frames)
    g = torch.Generator().manual_seed(seed)
    deltas = {float(t): [] for t in timesteps}
    deltas_indep = {float(t): [] for t in timesteps}
    labels = []
    device = next(model.parameters()).device
    for start in range(0, n_total, batch_size):
        batch = to_device(collate([pairs[i] for i in range(start, min(n_total, start + batch_size))]), device)
        lat_a, lat_b = pair_latents(adapter, batch, device)
        eps = torch.randn(lat_a.shape, generator=g).to(lat_a)
        eps_b = torch.randn(lat_a.shape, generator=g).to(lat_a)
        cond = None
        if getattr(model, "conditioning", "none") == "cond":
            cond = batch.get("cond") or adapter.encode_prompt(list(batch["prompt"]))
            cond = {k: torch.cat([v, v]).to(device).float() for k, v in cond.items()}
        labels.append(batch["reward_labels"].cpu())
        n = lat_a.shape[0]
        for t, chunks in deltas.items():
            tt = torch.full((n,), t, device=lat_a.device)
            x = torch.cat([flow.interpolate(lat_a, eps, tt), flow.interpolate(lat_b, eps, tt),
                           flow.interpolate(lat_b, eps_b, tt)])
            c3 = None if cond is None else {k: torch.cat([v, v[:n]]) for k, v in cond.items()}
            sc = model(x, torch.cat([tt, tt, tt]), c3)
            s = torch.stack([sc[d] for d in dims], dim=1).float().cpu()
            chunks.append(s[:n] - s[n:2 * n])
            deltas_indep[t].append(s[:n] - s[2 * n:])
    labels_all = torch.cat(labels)
    oracle_labels = None
    if oracle_scores is not None:
        diff = (oracle_scores[:n_total, 0] - oracle_scores[:n_total, 1]).double()
        oracle_labels = torch.where(diff >= tie_margin, 1.0, torch.where(diff <= -tie_margin, 0.0, 0.5))
    result: dict[str, Any] = {"pairs": n_total, "timesteps": [float(t) for t in timesteps], "dims": list(dims),
                              "tie_margin": tie_margin, "accuracy": {}}
    for j, d in enumerate(dims):
        per_t = {}
        for t, chunks in deltas.items():
            delta = torch.cat(chunks)[:, j]
            delta_i = torch.cat(deltas_indep[t])[:, j]
            m = {"labels": accuracy_without_ties(delta, labels_all[:, j])["accuracy"],
                 "labels_with_ties": accuracy_with_ties(delta, labels_all[:, j])["accuracy"],
                 "labels_independent": accuracy_without_ties(delta_i, labels_all[:, j])["accuracy"],
                 "oracle": None, "oracle_independent": None, "oracle_pairs": 0}
            if oracle_labels is not None:
                acc = accuracy_without_ties(delta, oracle_labels[:, j])
                m["oracle"], m["oracle_pairs"] = acc["accuracy"], acc["pairs"]
                m["oracle_independent"] = accuracy_without_ties(delta_i, oracle_labels[:, j])["accuracy"]
            per_t[f"{t:g}"] = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}
        result["accuracy"][d] = per_t
    return result


def format_eval_table(result: dict[str, Any]) -> str:
    """Accuracy per dimension and measure (rows) at each t (columns); `indep.`: B noised independently."""
    ts = [f"{t:g}" for t in result["timesteps"]]
    measures = [("oracle", "oracle"), ("oracle_independent", "oracle, indep."), ("labels", "labels"),
                ("labels_independent", "labels, indep.")]
    lines = [f"{'':22s}" + "".join(f"{'t=' + t:>9s}" for t in ts)]
    for d, per_t in result["accuracy"].items():
        for key, name in measures:
            if all(per_t[t].get(key) is None for t in ts):
                continue
            cells = "".join(f"{per_t[t][key]:9.3f}" if per_t[t].get(key) is not None else f"{'-':>9s}" for t in ts)
            lines.append(f"{d:6s}{name:16s}{cells}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    """`genalign train latent-reward --config RECIPE [--resume latest] [key=value ...]`."""
    from .command import parse_training_args, recipe_arg, run_training, train_and_report, training_parser

    prog = "genalign train latent-reward"
    parser = training_parser(prog, __doc__.split("\n\n")[0], default_config="latent_reward_world",
                             config_help="YAML recipe (default: the shipped latent_reward_world)")
    parsed = parse_training_args(parser, LatentRewardTrainConfig, argv)
    if parsed is None:
        return 0
    args, overrides = parsed

    def train() -> int:
        config = load_config(LatentRewardTrainConfig, recipe_arg(args.config), overrides)
        return train_and_report(LatentRewardTrainer.from_config(config), "latent reward model", format_eval_table,
                                "latent_reward_eval.json")

    return run_training(prog, train)


if __name__ == "__main__":
    sys.exit(main())
