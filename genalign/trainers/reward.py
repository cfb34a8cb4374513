"""Reward-model training: a PickScore-style CLIP reward or a VideoReward-style multi-dimensional video reward,
trained on preference pairs with the model's own loss (ALGORITHMS.md section 3).

- `kind="pickscore"` (`genalign.rewards.CLIPReward`): cross-entropy between the softmax over a pair's two scores
  `exp(logit_scale) * cos(image, text)` and the label distribution (a tie is [0.5, 0.5]); `loss=btt`: the
  Bradley-Terry-with-ties loss on the score difference instead (ties get their own probability);
- `kind="videoreward"` (`genalign.rewards.VideoReward`): per-dimension Bradley-Terry with ties (Rao-Kupper,
  theta = 5; `loss=bt`: plain BT, ties left out) on the VQ / MQ / TA labels of each pair; dimensions whose weight
  in `dims` is 0 are left out of the loss, and pairs without per-dimension labels use their overall label.

The model is the world-sized random-init builder (`model=world`; `tiny` for the test-sized one), a genalign reward
folder (training continues from it), a CLIP folder (transformers: PickScore's layout; open_clip's local-dir layout:
the world CLIP of stage 1) or a Qwen2-VL folder (the base of a VideoReward: LoRA on its language model,
`lora_rank`). Ties are kept by default (`tie_policy=half`): for a reward model they are signal. `augment_shift=N`
translates the training media by up to N pixels (against overfitting small data).

At the end the normalisation of every dimension (mean / std of the raw scores of the training pairs' media) is
fitted and saved with the model: `output_dir/reward_model/` is a `save_pretrained` folder that
`genalign.rewards.load_reward_model` reads (and `genalign score` / `genalign eval-reward`). With `eval_data`, the
final model is evaluated there (`output_dir/eval/reward_eval.json` + `.png`, see `genalign.eval.reward_eval`).

    from genalign.trainers.reward import RewardTrainConfig, RewardTrainer
    trainer = RewardTrainer.from_config(RewardTrainConfig(kind="pickscore", data="pairs.parquet"))
    trainer.train()

    genalign train reward --kind videoreward --config reward_videoreward_world data=pairs.csv
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, load_config
from .loop import (
    TrainConfig,
    Trainer,
    TrainResult,
    eval_mode,
    option,
)

logger = logging.getLogger("genalign.trainers")

KINDS = ("pickscore", "videoreward")
REWARD_KIND = {"pickscore": "clip", "videoreward": "video_reward"}
LOSSES = {"pickscore": ("pickscore", "btt"), "videoreward": ("btt", "bt")}
TIE_POLICIES = ("drop", "half", "keep_first")
WORLD_MODELS = ("world", "tiny")


@dataclass
class WorldCLIPSize:
    """The sizes of the world's CLIP (`world_clip_reward`): one set of keys for the reward trainer (model=world)
    and the stage-1 pretraining (genalign.world.clip_pretrain)."""

    clip_width: int = option(64, "world CLIP: hidden size of both towers")
    clip_layers: int = option(3, "world CLIP: layers per tower")
    clip_heads: int = option(4, "world CLIP: attention heads")
    clip_patch_size: int = option(4, "world CLIP, vit tower: patch size (the world renders 32x32)")
    clip_projection_dim: int = option(32, "world CLIP: joint embedding size")
    clip_image_tower: str = option("resnet", "world CLIP image tower: resnet (an open_clip CLIP with its "
                                             "ModifiedResNet tower) | vit (a transformers CLIPModel, patches of "
                                             "clip_patch_size; the world's CLIP before: 12.5 points less accurate from scratch)")
    clip_resnet_width: int = option(16, "world CLIP, resnet tower: stem width (stage widths 4, 8, 16, 32 x it)")
    clip_resnet_layers: list[int] = option(  # noqa: RUF009 - option() copies a list default (default_factory)
        [1, 1, 1, 1], "world CLIP, resnet tower: bottleneck blocks in each of the four stages")

    def __post_init__(self):
        super().__post_init__()
        if self.clip_image_tower not in ("vit", "resnet"):
            raise ConfigError(f"config key 'clip_image_tower': vit or resnet, got {self.clip_image_tower!r}")
        layers = self.clip_resnet_layers
        if not (isinstance(layers, list) and len(layers) == 4 and all(isinstance(n, int) and n >= 1 for n in layers)):
            raise ConfigError(f"config key 'clip_resnet_layers': four block counts >= 1, got {layers!r}")

    def build_world_clip(self, seed: int, image_size: int = 32):
        """A random-init world CLIP reward of these sizes."""
        return world_clip_reward(seed, image_size, self.clip_width, self.clip_layers, self.clip_heads,
                                 self.clip_patch_size, self.clip_projection_dim, image_tower=self.clip_image_tower,
                                 resnet_width=self.clip_resnet_width, resnet_layers=tuple(self.clip_resnet_layers))


@dataclass
class WorldVideoSize:
    """The sizes of the world's VideoReward (a tiny Qwen2-VL): one set of keys for the reward trainer (model=world)
    and the captioning pretraining (genalign.world.video_caption_pretrain)."""

    video_hidden_size: int = option(128, "world videoreward: language model hidden size")
    video_layers: int = option(4, "world videoreward: language model layers")
    video_vision_width: int = option(96, "world videoreward: vision tower width")
    video_vision_depth: int = option(4, "world videoreward: vision tower depth")
    video_patch_size: int = option(4, "world videoreward: vision patch size (merged 2x2 into one token)")

    def build_world_video_reward(self, seed: int, settings: dict[str, Any], tiny: bool = False):
        """A random-init world VideoReward of these sizes (`tiny`: the test-sized one), `settings` its
        VideoRewardConfig keys."""
        from ..rewards import (
            VideoReward,
            VideoRewardConfig,
            build_tiny_qwen2vl_tokenizer,
            tiny_qwen2vl_backbone,
        )

        tokenizer = build_tiny_qwen2vl_tokenizer()
        sizes = {} if tiny else {
            "hidden_size": self.video_hidden_size, "num_layers": self.video_layers,
            "vision_width": self.video_vision_width, "vision_depth": self.video_vision_depth,
            "patch_size": self.video_patch_size}
        backbone = tiny_qwen2vl_backbone(tokenizer, seed=seed, **sizes)
        torch.manual_seed(seed + 1)
        return VideoReward(backbone, tokenizer, VideoRewardConfig(**settings))


@dataclass
class RewardTrainConfig(WorldCLIPSize, WorldVideoSize, TrainConfig):
    output_dir: str = option("runs/reward", "run folder: checkpoints, metrics.jsonl, config.yaml, reward_model/, eval/")
    kind: str = option("pickscore", "pickscore (CLIP image reward, PickScore / HPSv2 style) | videoreward "
                                    "(VQ / MQ / TA on a Qwen2-VL backbone, VideoReward style)")
    data: str | None = option(None, "training pairs: Pick-a-Pic parquet, VideoAlign CSV, jsonl or folder layout")
    eval_data: str | None = option(None, "held-out pairs to evaluate the final model on (output_dir/eval/)")
    eval_max_pairs: int = option(0, "evaluate on the first N held-out pairs only (0: all)")
    model: str = option("world", "world: a random-init world-sized model (the sizes below) | tiny: the test-sized "
                                 "one | a folder: a genalign reward model (continue training it), a transformers "
                                 "CLIP folder (pickscore) or a Qwen2-VL folder (videoreward base)")
    loss: str = option("auto", "auto (pickscore: pickscore; videoreward: btt) | pickscore (cross-entropy of the "
                               "pair softmax; kind=pickscore) | btt (Bradley-Terry with ties; either kind) | bt "
                               "(plain BT, ties left out; kind=videoreward)")
    theta: float = option(5.0, "tie parameter of the BTT loss (> 1; VideoReward uses 5)")
    tie_policy: str = option("half", "ties of the overall label: half (kept; default: ties are signal for a "
                                     "reward model) | drop | keep_first (as A wins; biased)")
    dims: dict[str, float] | None = option(  # noqa: RUF009 - the default is None, not a shared dict
        None, "per-dimension weights (VideoAlign / jsonl data), e.g. '{\"VQ\": 1, \"MQ\": 1, \"TA\": 1}': the "
              "overall label is their weighted vote; a dimension of weight 0 is left out of the loss")
    lora_rank: int | None = option(None, "videoreward: LoRA rank on the language model (0: train it in full). "
                                         "None: 0 for model=world/tiny, 16 for a Qwen2-VL folder. pickscore: "
                                         "must be None or 0 (trained in full)")
    lora_alpha: float | None = option(None, "LoRA alpha (None: 2 x rank)")
    train_vision: bool = option(True, "train the vision tower (false: frozen; saves memory on a large pretrained "
                                      "backbone)")
    train_text: bool = option(True, "pickscore: train the text tower (the logit scale is always trained)")
    head: str = option("shared", "videoreward: shared (one linear output read at the three reward tokens, as the "
                                 "published model) | per_dimension")
    fps: float | None = option(None, "videoreward: fps of the training videos, stored with the model (None: the "
                                     "data's fps_A column, else 8)")
    num_frames: int = option(8, "videoreward: frames sampled from each video")
    resolution: int | None = option(32, "world / tiny models and Qwen2-VL folders: input size (CLIP image size; "
                                         "video frame size, None: Qwen2-VL's own resize rule)")
    max_prompt_tokens: int = option(32, "videoreward: prompt tokens kept (longer prompts are truncated, warned)")
    augment_shift: int = option(0, "training only: translate each training image / video by up to N pixels "
                                   "(edge-padded; a random whole number along x and y), against overfitting "
                                   "small data")
    preload: bool = option(False, "decode every training pair once into memory (small data, e.g. the world's; "
                                  "saves re-decoding MP4 / PNG files every epoch)")
    normalization_pairs: int = option(1024, "fit the normalisation on the media of this many training pairs "
                                            "(a seeded random subset; 0: all)")
    save_base: bool | None = option(None, "videoreward: save the backbone's base weights in the reward folder "
                                          "(None: unless it names a local base folder and only LoRA is trained)")

    def __post_init__(self):
        super().__post_init__()

        def bad(key, msg):
            raise ConfigError(f"config key {key!r}: {msg}")

        if self.kind not in KINDS:
            bad("kind", f"must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.loss == "auto":
            self.loss = LOSSES[self.kind][0]
        if self.loss not in LOSSES[self.kind]:
            bad("loss", f"kind={self.kind} trains with {' or '.join(LOSSES[self.kind])}, got {self.loss!r}")
        if self.tie_policy not in TIE_POLICIES:
            bad("tie_policy", f"must be one of {', '.join(TIE_POLICIES)}, got {self.tie_policy!r}")
        if not self.theta > 1:
            bad("theta", f"must be > 1, got {self.theta}")
        if self.head not in ("shared", "per_dimension"):
            bad("head", f"must be shared or per_dimension, got {self.head!r}")
        if self.kind == "pickscore" and self.lora_rank:
            bad("lora_rank", "pickscore models are trained in full (set train_vision / train_text to freeze a "
                             "tower); leave lora_rank unset")
        if self.lora_rank is not None and self.lora_rank < 0:
            bad("lora_rank", f"must be >= 0, got {self.lora_rank}")
        if self.kind == "pickscore" and not (self.train_vision or self.train_text):
            logger.info("train_vision=false and train_text=false: only the logit scale is trained")
        if self.num_frames < 1:
            bad("num_frames", f"must be >= 1, got {self.num_frames}")
        if self.fps is not None and self.fps <= 0:
            bad("fps", f"must be > 0, got {self.fps}")
        if self.dims is not None:
            if not isinstance(self.dims, dict) or not self.dims:
                bad("dims", f"expected a mapping of dimension -> weight, got {self.dims!r}")
            self.dims = {str(k): float(v) for k, v in self.dims.items()}
            if not any(self.dims.values()):
                bad("dims", "at least one dimension needs a non-zero weight")
        for key in ("eval_max_pairs", "normalization_pairs", "augment_shift"):
            if getattr(self, key) < 0:
                bad(key, f"must be >= 0, got {getattr(self, key)}")


# ------------------------------------------------------------------------------------------------ models
def world_clip_reward(seed: int = 0, image_size: int = 32, width: int = 64, layers: int = 3, heads: int = 4,
                      patch_size: int = 4, projection_dim: int = 32, *, image_tower: str = "resnet",
                      resnet_width: int = 16, resnet_layers: tuple[int, ...] = (1, 1, 1, 1)):
    """A random-init PickScore-style CLIP reward for the world: the world's word-level tokenizer, `image_size` pixels
    (the world renders 32x32), a text tower `width` wide and `layers` deep, and an image tower that is either

    - vit: a transformers CLIPModel whose vision tower has the text tower's sizes and patches of `patch_size`, or
    - resnet: an open_clip CLIP whose image tower is its ModifiedResNet (CLIP RN50's design: a three-convolution
      stem, four stages of `resnet_layers` bottleneck blocks, an attention pool), `resnet_width` wide at the stem.
      Convolutions see every pixel's neighbourhood, which is what the world's quality flaws (stray pixels, noise,
      blurred edges) are made of; a ViT of 4-pixel patches has to learn them from a linear patch embedding.
    """
    from ..rewards import CLIPReward
    from ..world.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    if image_tower == "resnet":
        from open_clip.model import CLIP

        config = {
            "embed_dim": projection_dim,
            "vision_cfg": {"layers": list(resnet_layers), "width": resnet_width, "image_size": image_size,
                           "head_width": 32},
            # the text tower of the vit variant in open_clip's terms: pooled at the end-of-text token; the tokenizer
            # is a transformers one, saved next to the weights (open_clip's local-dir layout reads it from there)
            "text_cfg": {"context_length": tokenizer.model_max_length, "vocab_size": len(tokenizer), "width": width,
                         "heads": heads, "layers": layers, "mlp_ratio": 2.0, "pool_type": "eos",
                         "eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id,
                         "hf_tokenizer_name": "genalign-world"},
        }
        return CLIPReward(CLIP(**config).eval(), tokenizer, backend="open_clip", image_size=image_size,
                          max_length=tokenizer.model_max_length, open_clip_config=config)
    if image_tower != "vit":
        raise ValueError(f"image_tower must be 'vit' or 'resnet', got {image_tower!r}")
    from transformers import CLIPConfig, CLIPModel

    tower = {"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": layers,
             "num_attention_heads": heads}
    config = CLIPConfig(
        text_config={**tower, "vocab_size": len(tokenizer), "max_position_embeddings": tokenizer.model_max_length,
                     "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={**tower, "image_size": image_size, "patch_size": patch_size},
        projection_dim=projection_dim,
    )
    return CLIPReward.from_transformers(CLIPModel(config).eval(), tokenizer)


def _video_settings(cfg: RewardTrainConfig, default_rank: int, fps: float) -> dict[str, Any]:
    rank = default_rank if cfg.lora_rank is None else cfg.lora_rank
    settings = {"fps": fps, "num_frames": cfg.num_frames, "head": cfg.head, "loss": cfg.loss,
                "tie_theta": cfg.theta, "lora_rank": rank, "lora_alpha": cfg.lora_alpha or float(2 * max(rank, 1)),
                "train_vision": cfg.train_vision, "max_prompt_tokens": cfg.max_prompt_tokens}
    if cfg.resolution:
        settings["frame_size"] = (cfg.resolution, cfg.resolution)
    return settings


def build_reward_model(cfg: RewardTrainConfig, fps: float | None = None):
    """The reward model a config asks for (see the `model` key), seeded with `cfg.seed`."""
    from ..rewards import RewardLoadError, detect_reward_kind, load_reward_model

    fps = float(cfg.fps or fps or 8.0)
    torch.manual_seed(cfg.seed)
    if not cfg.model or cfg.model in ("None", "null"):  # a recipe's `model: null` reads as the text None
        raise ConfigError("config key 'model': give the model to train (world | tiny | a folder), e.g. model=PATH")
    if cfg.model in WORLD_MODELS:
        if cfg.kind == "pickscore":
            if cfg.model == "tiny":
                from ..rewards import tiny_clip_reward

                return tiny_clip_reward(seed=cfg.seed, image_size=cfg.resolution or 32)
            return cfg.build_world_clip(cfg.seed, cfg.resolution or 32)
        return cfg.build_world_video_reward(cfg.seed, _video_settings(cfg, 0, fps), tiny=cfg.model == "tiny")

    path = Path(cfg.model)
    if not path.is_dir():
        raise ConfigError(f"config key 'model': {cfg.model!r} is neither world / tiny nor an existing folder")
    config_json = path / "config.json"
    model_type = None
    if config_json.is_file():
        try:
            model_type = json.loads(config_json.read_text()).get("model_type")
        except json.JSONDecodeError:
            model_type = None
    if cfg.kind == "videoreward" and model_type in ("qwen2_vl", "qwen2_5_vl") and not (path / "genalign_reward.json").is_file():
        from transformers import AutoTokenizer, Qwen2VLModel

        from ..rewards import VideoReward, VideoRewardConfig

        backbone = Qwen2VLModel.from_pretrained(path).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        settings = _video_settings(cfg, 16, fps)
        if not cfg.resolution:
            settings.pop("frame_size", None)
        torch.manual_seed(cfg.seed + 1)
        return VideoReward(backbone, tokenizer, VideoRewardConfig(**settings, base_model_path=str(path.resolve())))
    found = detect_reward_kind(path)
    if found != REWARD_KIND[cfg.kind]:
        raise RewardLoadError(f"config key 'model': {str(path)!r} holds a {found!r} reward model, but kind="
                              f"{cfg.kind} trains a {REWARD_KIND[cfg.kind]!r} one")
    model = load_reward_model(path)
    if cfg.kind == "videoreward":  # training settings of this run; the architecture (LoRA, head) is the folder's
        model.config.loss, model.config.tie_theta = cfg.loss, cfg.theta
        model.config.train_vision = cfg.train_vision
        if cfg.fps:
            model.config.fps = model.training_fps = float(cfg.fps)
        if cfg.lora_rank is not None and cfg.lora_rank != model.config.lora_rank:
            logger.warning("model=%s has LoRA rank %d: lora_rank=%d is ignored when continuing a reward model",
                           path, model.config.lora_rank, cfg.lora_rank)
        model._set_trainable()
    return model


def set_clip_trainable(model, train_vision: bool, train_text: bool) -> None:
    """Which parts of a CLIPReward train: the vision tower (+ its projection), the text tower (+ projection);
    the logit scale always."""
    for name, p in model.clip.named_parameters():
        if model.backend == "transformers":
            vision = name.startswith(("vision_model.", "visual_projection"))
        else:
            vision = name.startswith("visual.")
        if name.startswith("logit_scale") or name == "logit_bias":
            p.requires_grad_(True)
        else:
            p.requires_grad_(train_vision if vision else train_text)


# ------------------------------------------------------------------------------------------------ data
def random_shift(pixels: list[torch.Tensor], max_shift: int, generator: torch.Generator | None = None
                 ) -> list[torch.Tensor]:
    """Each image (C, H, W) or video (F, C, H, W) translated by a random whole number of pixels in [-max_shift,
    max_shift] along x and y (a video's frames alike), the uncovered border filled by repeating the edge pixels.

    The augmentation of `augment_shift`: a reward model of small data learns where its training pictures' pixels
    happen to be; the judgements it is taught (is the object well formed, sharp, of the right colour, left of the
    other one) do not change under a small translation."""
    out = []
    for x in pixels:
        dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=generator))
        h, w = x.shape[-2:]
        frames = x.reshape(-1, *x.shape[-3:])
        padded = torch.nn.functional.pad(frames, (max_shift,) * 4, mode="replicate")
        top, left = max_shift + dy, max_shift + dx
        out.append(padded[..., top:top + h, left:left + w].reshape(x.shape))
    return out


def normalization_indices(n: int, k: int, seed: int) -> list[int]:
    """The pairs whose media fit a reward model's normalisation: all n, or k of them drawn with `seed`, in order."""
    indices = list(range(n))
    if k and k < n:
        indices = sorted(random.Random(seed).sample(indices, k))
    return indices


@torch.no_grad()
def fit_normalization_on_pairs(model, pairs, indices: Sequence[int], batch_size: int = 32) -> dict[str, dict[str, float]]:
    """Set each dimension's normalisation of `model` to the mean / std of its raw scores of the media (A and B) of
    `pairs[i]`, i in `indices` (a reward trainer's training pairs; an ensemble's); returns the statistics."""
    from ..eval.reward_eval import score_pairs

    before = model.normalize
    model.normalize = False
    try:
        with eval_mode(model):
            raw = score_pairs(model, pairs, indices, batch_size=batch_size)
    finally:
        model.normalize = before
    stats = {}
    for d in model.dimensions:
        x = torch.from_numpy(np.concatenate(raw[d])).double()
        std = float(x.std(unbiased=False)) if x.numel() > 1 else 1.0
        stats[d] = {"mean": float(x.mean()), "std": std if std > 1e-8 else 1.0}
    model.set_normalization(stats)
    logger.info("normalisation fitted on %d media: %s", 2 * len(indices),
                ", ".join(f"{d} mean {s['mean']:.4g} std {s['std']:.4g}" for d, s in stats.items()))
    return stats


class PreloadedPairs(torch.utils.data.Dataset):
    """Every pair of a dataset decoded once and kept in memory.

    When every medium is a file of its own (VideoAlign CSV rows, folder layouts), each file is decoded once, however
    many pairs name it (K samples per prompt make K - 1 pairs of each), and the pairs share the arrays; `workers`
    threads decode them (PyAV decodes without holding the GIL: the 6144 clips of the world's 3072 video pairs in
    17.5 s with both cores busy; imageio's ffmpeg process per file, 12-25 files a second). Media inside a parquet
    file are read in order by one thread (its reader keeps one row group at a time)."""

    def __init__(self, dataset, workers: int | None = None):
        from concurrent.futures import ThreadPoolExecutor

        from tqdm.auto import tqdm

        self.source = getattr(dataset, "source", "")
        records = getattr(dataset, "records", None)
        own_files = (bool(records) and hasattr(dataset, "pair_with_media")
                     and all(r.a.path is not None and r.b.path is not None for r in records))
        workers = workers if workers is not None else min(8, 2 * (os.cpu_count() or 1))
        if own_files:
            first_use = {}  # file -> (the first pair naming it, its reference there)
            for i, r in enumerate(records):
                for ref in (r.a, r.b):
                    first_use.setdefault(ref.path, (i, ref))
            progress = tqdm(total=len(first_use), desc="decoding media files", mininterval=2,
                            disable=len(first_use) < 256)

            def decode_file(use):
                medium = dataset.load_medium(*use)
                progress.update()
                return medium

            with ThreadPoolExecutor(max(1, workers)) as pool:  # in order; the first error is raised
                media = dict(zip(first_use, pool.map(decode_file, first_use.values())))
            progress.close()
            self.pairs = [dataset.pair_with_media(i, media[r.a.path], media[r.b.path]) for i, r in enumerate(records)]
            self.files_decoded = len(media)
            return
        progress = tqdm(total=len(dataset), desc="decoding pairs", mininterval=2, disable=len(dataset) < 256)

        def decode(i):
            pair = dataset[i]
            progress.update()
            return pair

        self.pairs = [decode(i) for i in range(len(dataset))]
        progress.close()
        self.files_decoded = None  # media inside a store, read in order

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i):
        return self.pairs[i]


def data_fps(dataset) -> float | None:
    """The median fps of the videos of a PreferenceDataset (its fps_A / fps_B columns), None if unknown."""
    values = []
    for r in getattr(dataset, "records", []):
        for key in ("fps_a", "fps_b", "fps_A", "fps_B"):
            v = (r.meta or {}).get(key)
            if isinstance(v, (int, float)) and v > 0:
                values.append(float(v))
    if not values:
        return None
    values.sort()
    return values[len(values) // 2]


class RewardCollator:
    """`genalign.rewards.collate_reward_pairs`, with the labels of zero-weight dimensions masked (NaN)."""

    def __init__(self, masked_dims: tuple[str, ...] = ()):
        self.masked_dims = tuple(masked_dims)

    def __call__(self, pairs):
        from ..rewards import collate_reward_pairs

        batch = collate_reward_pairs(pairs)
        for d in self.masked_dims:
            if d in batch["labels"]:
                batch["labels"][d] = torch.full_like(batch["labels"][d], float("nan"))
        return batch


# ------------------------------------------------------------------------------------------------ trainer
class RewardTrainer(Trainer):
    """Trains `model` (a `genalign.rewards` CLIPReward or VideoReward) with its own `loss(batch)`.

    dataset: preference pairs (a `PreferenceDataset` or a list of `PreferencePair`s). The run's final model is
    `output_dir/reward_model/` (`save_pretrained`, normalisation fitted on the training pairs).
    """

    config_class = RewardTrainConfig
    model_subdir = "reward_model"

    def __init__(self, model, config: RewardTrainConfig, dataset, eval_dataset=None):
        if not isinstance(config, RewardTrainConfig):
            raise TypeError(f"config must be a RewardTrainConfig, got {type(config).__name__}")
        expected = REWARD_KIND[config.kind]
        if getattr(model, "kind", None) != expected:
            raise ConfigError(f"config key 'kind': kind={config.kind} trains a {expected!r} reward model, got "
                              f"{type(model).__name__} ({getattr(model, 'kind', None)!r})")
        if config.kind == "pickscore":  # the run's objective (a VideoReward carries it in its config)
            model.training_loss, model.tie_theta = config.loss, config.theta
        self.eval_dataset = eval_dataset
        self.eval_result: dict[str, Any] | None = None
        self._normalization: dict[tuple[int, bool], dict] = {}
        masked = tuple(d for d, w in (config.dims or {}).items() if not w)
        super().__init__(config, model=model, train_dataset=dataset, collate_fn=RewardCollator(masked))

    # ------------------------------------------------------------------------------------- setup
    def prepare_model(self) -> None:
        cfg, model = self.config, self.model
        if cfg.kind == "pickscore":
            set_clip_trainable(model, cfg.train_vision, cfg.train_text)
        model.to(self.device)
        if self.weight_dtype != torch.float32:
            # frozen weights in the half dtype, trainable ones kept bit for bit in float32
            trainable = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
            model.to(self.weight_dtype)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in trainable:
                        p.data = trainable[n]

    # ------------------------------------------------------------------------------------- the loss
    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.config.augment_shift:
            from ..rewards import media_to_unit_pixels

            # seeded by the data position (and the process), so that a resumed run draws the shifts an uninterrupted
            # one draws
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.state.consumed_batches
                                                      + (self.accelerator.process_index << 32))
            shift = self.config.augment_shift
            batch = {**batch, "media_a": random_shift(media_to_unit_pixels(batch["media_a"]), shift, generator),
                     "media_b": random_shift(media_to_unit_pixels(batch["media_b"]), shift, generator)}
        loss, metrics = self.model.loss(batch)
        metrics = {k: v for k, v in metrics.items() if k != "loss"}
        labels = batch["label"]
        metrics["ties_in_batch"] = float((labels == 0.5).sum())
        return loss, metrics

    def nonfinite_hint(self) -> str:
        if self.config.kind == "pickscore":
            return "the CLIP logit scale grew too large (exp(logit_scale) scales the scores): lower lr"
        return f"the reward head's outputs overflowed (mixed_precision={self.config.mixed_precision})"

    # ------------------------------------------------------------------------------------- saving
    def _normalization_pairs(self) -> list[int]:
        return normalization_indices(len(self.train_dataset), self.config.normalization_pairs, self.config.seed)

    def fit_normalization(self) -> dict[str, dict[str, float]]:
        """Mean / std of the raw scores of the training pairs' media (A and B), per dimension; set on the model."""
        return fit_normalization_on_pairs(self.model, self.train_dataset, self._normalization_pairs(),
                                          batch_size=max(8, self.config.batch_size))

    def save_model(self, directory: Path) -> None:
        """`save_pretrained` of the reward model. At the final step the normalisation is fitted first (once per
        weight set: the EMA weights get their own)."""
        if self.state.step >= self.config.max_steps:
            key = (self.state.step, directory.name.endswith("_ema"))
            if key not in self._normalization:
                self._normalization[key] = self.fit_normalization()
            else:
                self.model.set_normalization(self._normalization[key])
        kwargs = {}
        if self.config.kind == "videoreward":
            save_base = self.config.save_base
            if save_base is None and not self.model.uses_lora:
                save_base = True  # the language model itself was trained
            kwargs["save_base"] = save_base
        self.model.save_pretrained(directory, **kwargs)

    # ------------------------------------------------------------------------------------- train + eval
    def train(self, stop_at_step: int | None = None) -> TrainResult:
        result = super().train(stop_at_step)
        if result.final_model_dir is not None and self.eval_dataset is not None and self.is_main:
            self.eval_result = self.evaluate(self.eval_dataset, self.output_dir / "eval")
        return result

    def evaluate(self, dataset, out_dir: Path | None = None) -> dict[str, Any]:
        """Accuracy of the current model on `dataset` (`genalign.eval.reward_eval.evaluate_reward`); with
        `out_dir`, the JSON + PNG report is written there and the numbers are logged to metrics.jsonl."""
        from ..eval.reward_eval import evaluate_reward, format_table, write_reward_report

        result = evaluate_reward(self.model, dataset, batch_size=max(8, self.config.batch_size),
                                 max_pairs=self.config.eval_max_pairs or None, label_weights=self.config.dims)
        result["step"] = self.state.step
        if out_dir is not None:
            write_reward_report(result, out_dir, f"{self.config.kind} reward, step {self.state.step}")
            record: dict[str, Any] = {"step": self.state.step}
            for dim, m in result["dimensions"].items():
                record[f"eval/{dim}/accuracy_without_ties"] = m["accuracy_without_ties"]
                record[f"eval/{dim}/accuracy_with_ties"] = m["accuracy_with_ties"]
            self._append_metrics(record)
            logger.info("held-out evaluation (%d pairs):\n%s", result["pairs"], format_table(result))
        return result

    def _append_metrics(self, record: dict[str, Any]) -> None:
        # straight to metrics.jsonl: the trackers are closed once the loop has finished
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.items()}
        with open(self.output_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(clean) + "\n")

    # ------------------------------------------------------------------------------------- from a config
    @classmethod
    def from_config(cls, config: RewardTrainConfig) -> RewardTrainer:
        """Load the data (`data`, `eval_data`) and build the model (`model`), then the trainer."""
        if not config.data:
            raise ConfigError("config key 'data': give the training pairs (data=PATH: Pick-a-Pic parquet, "
                              "VideoAlign CSV, jsonl or a folder layout)")
        dataset = load_reward_pairs(config.data, config)
        eval_dataset = None
        if config.eval_data:
            from ..data import load_preference_pairs

            eval_dataset = load_preference_pairs(config.eval_data, tie_policy="half", dims=_dims_arg(config, config.eval_data))
        model = build_reward_model(config, fps=data_fps(dataset))
        if config.preload:
            dataset = PreloadedPairs(dataset)
        return cls(model, config, dataset, eval_dataset=eval_dataset)


def _dims_arg(config: RewardTrainConfig, data: str):
    """`dims` weights go to the reader only for data with per-dimension labels (parquet / folders have none)."""
    if config.dims is None:
        return None
    suffix = Path(data).suffix.lower()
    return config.dims if suffix in (".csv", ".tsv", ".jsonl", ".ndjson") else None


def load_reward_pairs(data: str, config: RewardTrainConfig):
    from ..data import load_preference_pairs

    dataset = load_preference_pairs(data, tie_policy=config.tie_policy, dims=_dims_arg(config, data))
    if len(dataset) == 0:
        raise ConfigError(f"config key 'data': {data!r} holds no usable pairs ({dataset.summary()})")
    return dataset


# ------------------------------------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    """`genalign train reward --kind pickscore|videoreward [--config RECIPE] [--resume latest] [key=value ...]`.

    Without --config, the kind's shipped world recipe (reward_<kind>_world) is used."""
    from .command import parse_training_args, recipe_arg, run_training, train_and_report, training_parser

    prog = "genalign train reward"
    parser = training_parser(prog, __doc__.split("\n\n")[0],
                             config_help="YAML recipe (default: genalign/recipes/reward_<kind>_world.yaml)")
    parser.add_argument("--kind", choices=KINDS, help="pickscore | videoreward (same as kind=...)")
    parsed = parse_training_args(parser, RewardTrainConfig, argv)
    if parsed is None:
        return 0
    args, overrides = parsed
    kind_override = next((o.split("=", 1)[1].strip() for o in overrides if o.startswith("kind=")), None)
    kind = args.kind or kind_override
    if args.config is None and kind is None:
        print(f"{prog}: error: give --kind pickscore|videoreward (or --config RECIPE)", file=sys.stderr)
        return 2
    recipe = recipe_arg(args.config or f"reward_{kind}_world")
    if args.kind:
        overrides.append(f"kind={args.kind}")

    def train() -> int:
        if args.kind and recipe and Path(recipe).is_file():
            import yaml

            recipe_kind = (yaml.safe_load(Path(recipe).read_text()) or {}).get("kind")
            if recipe_kind and recipe_kind != args.kind:
                raise ConfigError(f"recipe {recipe!r} is for kind={recipe_kind}, but --kind {args.kind} was given")
        from ..eval.reward_eval import format_table

        trainer = RewardTrainer.from_config(load_config(RewardTrainConfig, recipe, overrides))
        return train_and_report(trainer, "reward model", format_table)

    return run_training(prog, train)


if __name__ == "__main__":
    sys.exit(main())
