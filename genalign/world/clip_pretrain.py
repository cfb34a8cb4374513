"""Stage 1 of the world's PickScore-style reward: a world CLIP, pretrained contrastively on captioned renders.

PickScore (arXiv 2305.01569) fine-tunes a CLIP that was first pretrained on a large captioned corpus; a CLIP
trained from scratch on a few thousand preference pairs does not learn composition (measured on the world: 56%
without ties against a 92% ceiling). This module is the world's analogue of that pretraining: CLIP's InfoNCE
(`genalign.losses.clip_contrastive_loss`) on image-caption pairs that are cheap to make in quantity.

The caption pool (`make_caption_pool`) draws train-split prompts only (held-out prompts are never rendered) and
makes *groups* of pictures:

- the prompt's render, captioned with the prompt; with probability `degraded` degraded the way the generators'
  corpus is (blur, noise, artefacts, malformed shapes), with probability `wrong_caption` captioned wrongly (one
  attribute swapped: the corpus's caption noise);
- with `hard_negatives`, a render of a *hard-negative* prompt: the same template with one thing changed (a
  colour, a shape, the count, or the relation's order), also from the train split. The two share a batch, so
  each caption must prefer its own picture over a near miss and vice versa: composition, not bags of words;
- with probability `quality_negatives`, a degraded copy of a clean render, with the same caption but not a
  positive of it in the text -> image direction: the caption learns to prefer the clean picture (the quality
  side of a preference), while the copy still matches its caption better than any other caption;
- with probability `composition_negatives`, a flawed twin of a clean render (`render.render_flawed_image`: the
  same background and layout with an object missing, an extra object, or two objects merged into one blob), a
  text -> image negative of the caption like the degraded copy: the failures that decide most comparisons of
  two samples of one prompt (a generator's merged or extra objects), which a swapped caption never shows;
- with probability `autoencoder`, every picture of the group goes through the world autoencoder's round trip
  (encode, decode), so the pictures look like the generators' outputs (which the autoencoder decodes).

`CLIPPretrainTrainer` runs on the shared training loop (checkpoints, resume, metrics.jsonl, accelerate) and
saves the CLIP in its backend's published layout with the world's tokenizer: open_clip's local-dir layout for the
default ResNet image tower (`open_clip_config.json`, `open_clip_model.safetensors`, the tokenizer files), a
transformers CLIP folder (PickScore's layout) for `clip_image_tower=vit`. `genalign train reward --kind pickscore
model=<run>/clip` fine-tunes it (stage 2), `genalign.rewards.load_reward_model(<run>/clip)` scores with it.

    from genalign.world.clip_pretrain import CLIPPretrainConfig, CLIPPretrainTrainer
    trainer = CLIPPretrainTrainer.from_config(CLIPPretrainConfig(output_dir="runs/world-clip"))
    trainer.train()                                # runs/world-clip/clip/: the pretrained CLIP folder
"""

from __future__ import annotations

import copy
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ConfigError
from ..models import default_device
from ..trainers.loop import TrainConfig, Trainer, eval_mode, option
from ..trainers.reward import WorldCLIPSize
from .corpus import miscaption
from .grammar import image_splits, parse_prompt
from .render import (
    COMPOSITION_FLAWS,
    IMAGE_CORRUPTIONS,
    corrupt_image,
    render_flawed_image,
    render_image,
    to_uint8,
)

logger = logging.getLogger("genalign.world")

CHUNK_GROUPS = 1000  # groups per seeded chunk: the pool is the same whatever the number of workers
DEFAULT_TEMPLATE_MIX = {"single": 0.2, "count": 0.2, "relation": 0.6}


@dataclass
class CLIPPretrainConfig(WorldCLIPSize, TrainConfig):
    output_dir: str = option("runs/world-clip", "run folder: checkpoints, metrics.jsonl, config.yaml, clip/")
    max_steps: int = option(2500, "optimizer steps")
    batch_size: int = option(256, "groups per batch (each group: a render, its hard negative and maybe degraded "
                                  "copies: about 2.9 pictures per group)")
    lr: float = option(1e-3, "peak learning rate (AdamW)")
    lr_scheduler: str = option("cosine", "LR schedule after warmup")
    warmup_steps: int = option(200, "linear warmup steps")
    weight_decay: float = option(0.1, "AdamW weight decay")
    checkpoint_every: int = option(1000, "checkpoint every N steps")
    keep_checkpoints: int = option(1, "checkpoints kept")
    log_every: int = option(50, "log every N steps")
    # the caption pool
    pool_groups: int = option(20000, "groups in the pre-rendered caption pool (train-split prompts only)")
    pool_seed: int | None = option(None, "seed of the pool (None: seed)")
    pool_workers: int = option(1, "processes rendering the pool (the pool does not depend on it)")
    template_mix: dict[str, float] = option(  # noqa: RUF009 - option() copies a dict default (default_factory)
        DEFAULT_TEMPLATE_MIX, "share of single / count / relation prompts")
    hard_negatives: bool = option(True, "add a render of a one-attribute-swapped train prompt to every group")
    wrong_caption: float = option(0.0, "share of renders captioned wrongly (the corpus's caption noise; 0.25 there)")
    degraded: float = option(0.2, "share of renders degraded like the corpus's (captioned normally)")
    quality_negatives: float = option(0.5, "share of clean renders that get a degraded copy as a text -> image "
                                           "negative of their caption")
    composition_negatives: float = option(0.0, "share of clean renders that get a flawed twin (an object missing, "
                                               "an extra one, two merged) as a text -> image negative of their caption")
    autoencoder: float = option(0.5, "share of groups passed through the world autoencoder's round trip")
    autoencoder_path: str | None = option(None, "the autoencoder folder (None: the shipped world autoencoder)")
    # the model: the world CLIP (WorldCLIPSize's keys: a ResNet or ViT image tower) with the world's tokenizer
    resolution: int = option(32, "the CLIP's input size; the 32-pixel renders are resized to it inside the model "
                                 "(and a reward fine-tuned from it keeps it)")
    eval_images: int = option(512, "held-out-prompt renders for the zero-shot check at the end (0: none)")

    def __post_init__(self):
        super().__post_init__()

        def bad(key, msg):
            raise ConfigError(f"config key {key!r}: {msg}")

        for key in ("wrong_caption", "degraded", "quality_negatives", "composition_negatives", "autoencoder"):
            if not 0 <= getattr(self, key) <= 1:
                bad(key, f"must be in [0, 1], got {getattr(self, key)}")
        step = 32 if self.clip_image_tower == "resnet" else self.clip_patch_size  # the tower's total stride
        if self.resolution < step or self.resolution % step:
            bad("resolution", f"a multiple of {step} for the {self.clip_image_tower} tower, got {self.resolution}")
        if self.pool_groups < self.batch_size:
            bad("pool_groups", f"must be >= batch_size ({self.batch_size}), got {self.pool_groups}")
        if not isinstance(self.template_mix, dict) or not any(v > 0 for v in self.template_mix.values()):
            bad("template_mix", f"expected e.g. {DEFAULT_TEMPLATE_MIX}, got {self.template_mix!r}")
        unknown = set(self.template_mix) - {"single", "count", "relation"}
        if unknown:
            bad("template_mix", f"unknown templates {sorted(unknown)} (single, count, relation)")
        if self.pool_workers < 1:
            bad("pool_workers", f"must be >= 1, got {self.pool_workers}")


# ------------------------------------------------------------------------------------------------ the pool
def hard_negative_prompt(prompt: str, rng: random.Random, allowed: set[str] | None = None, tries: int = 50) -> str:
    """A prompt of the same template as `prompt` with one thing changed (`corpus.miscaption`: a colour, a shape,
    the count or the relation's order), drawn from `allowed` when given (e.g. the train split)."""
    for _ in range(tries):
        other = miscaption(prompt, rng)
        if other != prompt and (allowed is None or other in allowed):
            return other
    # a prompt whose near misses are all outside `allowed` (rare): any other allowed prompt of its template
    template = parse_prompt(prompt).template
    pool = sorted(p for p in (allowed or ()) if p != prompt and parse_prompt(p).template == template)
    if not pool:
        raise ValueError(f"no hard negative for {prompt!r} in the allowed prompts")
    return rng.choice(pool)


@dataclass
class CaptionPool:
    """Pre-rendered pictures and captions, grouped: group g holds pictures group_start[g]:group_start[g + 1]."""

    images: np.ndarray  # uint8 (K, 32, 32, 3)
    captions: list[str]  # (K,) the caption of each picture
    positive: np.ndarray  # bool (K,): a text -> image positive of its caption (False: a quality negative)
    group_start: np.ndarray  # int (G + 1,)
    autoencoded: np.ndarray  # bool (K,)

    def __len__(self) -> int:
        return len(self.group_start) - 1

    def group(self, g: int) -> dict[str, Any]:
        a, b = int(self.group_start[g]), int(self.group_start[g + 1])
        return {"images": self.images[a:b], "captions": self.captions[a:b], "positive": self.positive[a:b]}


def _render_chunk(args) -> tuple[np.ndarray, list[str], list[bool], list[int], list[bool]]:
    """Groups [start, start + n) of a pool: (images, captions, positive, group sizes, autoencoder flags per
    group). Seeded by (seed, start), so the pool does not depend on how it was split over processes."""
    seed, start, n, opts = args
    rng = random.Random(f"{seed}-{start}")
    nrng = np.random.default_rng([seed, start])
    twin_rng = random.Random(f"{seed}-{start}-twins")  # its own stream: the rest of the pool stays as without twins
    train = image_splits().train
    allowed = set(train)
    by_template: dict[str, list[str]] = {}
    for p in train:
        by_template.setdefault(parse_prompt(p).template, []).append(p)
    mix = {t: w for t, w in opts["template_mix"].items() if w > 0}
    images, captions, positive, sizes, ae = [], [], [], [], []
    for _ in range(n):
        template = rng.choices(list(mix), weights=list(mix.values()))[0]
        prompt = rng.choice(by_template[template])
        prompts = [prompt]
        if opts["hard_negatives"]:
            prompts.append(hard_negative_prompt(prompt, rng, allowed))
        count = 0
        for q in prompts:
            twin_layout = copy.deepcopy(nrng)  # the flawed twin draws the same background and layout
            clean = render_image(q, nrng)
            caption = miscaption(q, rng) if rng.random() < opts["wrong_caption"] else q
            degraded = rng.random() < opts["degraded"]
            img = corrupt_image(clean, rng.choice(IMAGE_CORRUPTIONS), nrng) if degraded else clean
            images.append(to_uint8(img))
            captions.append(caption)
            positive.append(True)
            count += 1
            if not degraded and rng.random() < opts["quality_negatives"]:
                images.append(to_uint8(corrupt_image(clean, rng.choice(IMAGE_CORRUPTIONS), nrng)))
                captions.append(caption)
                positive.append(False)
                count += 1
            if not degraded and twin_rng.random() < opts["composition_negatives"]:
                flaws = [f for f in COMPOSITION_FLAWS if f != "merged" or len(parse_prompt(q).objects) > 1]
                images.append(to_uint8(render_flawed_image(q, twin_layout, twin_rng.choice(flaws))))
                captions.append(caption)
                positive.append(False)
                count += 1
        sizes.append(count)
        ae.append(rng.random() < opts["autoencoder"])
    return np.stack(images), captions, positive, sizes, ae


@torch.no_grad()
def autoencoder_round_trip(images: np.ndarray, vae, batch_size: int = 1024, device: str | torch.device = "cpu"
                           ) -> np.ndarray:
    """uint8 (N, H, W, 3) -> the autoencoder's reconstructions (posterior mean, decoded), uint8."""
    if images.dtype != np.uint8:  # floats in [0, 1] would be read as near-black pixels
        raise ValueError(f"autoencoder_round_trip takes uint8 pixels, got {images.dtype} (the renderer's floats: "
                         f"genalign.world.render.to_uint8 first)")
    out = np.empty_like(images)
    vae = vae.to(device)
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i:i + batch_size]).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
        out[i:i + batch_size] = ((y.clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return out


def load_world_autoencoder(path: str | Path | None = None):
    from diffusers import AutoencoderKL

    from . import ASSETS

    path = Path(path) if path else ASSETS / "autoencoder"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no world autoencoder at {path} (`genalign world build --only vae`)")
    return AutoencoderKL.from_pretrained(path).eval().requires_grad_(False)


def make_caption_pool(groups: int, seed: int = 0, *, template_mix: dict[str, float] | None = None,
                      hard_negatives: bool = True, wrong_caption: float = 0.0, degraded: float = 0.2,
                      quality_negatives: float = 0.5, composition_negatives: float = 0.0, autoencoder: float = 0.5,
                      vae=None, workers: int = 1, device: str | torch.device = "cpu") -> CaptionPool:
    """The caption pool (module docstring). `vae`: the autoencoder for the round trip (loaded from the world's
    assets when `autoencoder > 0` and none is given)."""
    opts = {"template_mix": dict(template_mix or DEFAULT_TEMPLATE_MIX), "hard_negatives": hard_negatives,
            "wrong_caption": wrong_caption, "degraded": degraded, "quality_negatives": quality_negatives,
            "composition_negatives": composition_negatives, "autoencoder": autoencoder}
    jobs = [(seed, s, min(CHUNK_GROUPS, groups - s), opts) for s in range(0, groups, CHUNK_GROUPS)]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            parts = pool.map(_render_chunk, jobs)
    else:
        parts = [_render_chunk(j) for j in jobs]
    images = np.concatenate([p[0] for p in parts])
    captions = [c for p in parts for c in p[1]]
    positive = np.array([x for p in parts for x in p[2]], dtype=bool)
    sizes = np.array([x for p in parts for x in p[3]], dtype=np.int64)
    group_ae = np.array([x for p in parts for x in p[4]], dtype=bool)
    group_start = np.concatenate([[0], np.cumsum(sizes)])
    autoencoded = np.repeat(group_ae, sizes)
    if autoencoded.any():
        vae = vae if vae is not None else load_world_autoencoder()
        images[autoencoded] = autoencoder_round_trip(images[autoencoded], vae, device=device)
    return CaptionPool(images, captions, positive, group_start, autoencoded)


class CaptionPoolDataset(torch.utils.data.Dataset):
    """One item per group of a `CaptionPool`."""

    def __init__(self, pool: CaptionPool):
        self.pool = pool

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, g: int) -> dict[str, Any]:
        return self.pool.group(g)


def collate_caption_groups(groups: list[dict[str, Any]]) -> dict[str, Any]:
    """Groups -> {"pixels": float (N, 3, H, W) in [0, 1], "captions": the M distinct captions, "image_caption":
    long (N,), "text_positive": bool (M, N)} for `clip_contrastive_loss`."""
    images = np.concatenate([g["images"] for g in groups])
    captions = [c for g in groups for c in g["captions"]]
    positive = np.concatenate([np.asarray(g["positive"], dtype=bool) for g in groups])
    distinct = list(dict.fromkeys(captions))
    index = {c: j for j, c in enumerate(distinct)}
    image_caption = torch.tensor([index[c] for c in captions], dtype=torch.long)
    text_positive = (image_caption[None, :] == torch.arange(len(distinct))[:, None]) & torch.from_numpy(positive)[None, :]
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return {"pixels": pixels, "captions": distinct, "image_caption": image_caption, "text_positive": text_positive}


# ------------------------------------------------------------------------------------------------ the trainer
def save_clip_folder(model, directory: Path) -> None:
    """The CLIP in its backend's published layout (`CLIPReward._save_weights`): an open_clip local-dir folder, or a
    transformers CLIP folder (PickScore's layout: the CLIPModel, the tokenizer, preprocessor_config.json)."""
    directory.mkdir(parents=True, exist_ok=True)
    model._save_weights(directory)


class CLIPPretrainTrainer(Trainer):
    """CLIP InfoNCE on a caption pool; the final model is `output_dir/clip/` (a CLIP folder, `save_clip_folder`)."""

    config_class = CLIPPretrainConfig
    model_subdir = "clip"

    def __init__(self, model, config: CLIPPretrainConfig, pool: CaptionPool):
        if not isinstance(config, CLIPPretrainConfig):
            raise TypeError(f"config must be a CLIPPretrainConfig, got {type(config).__name__}")
        self.pool = pool
        self.zero_shot: dict[str, float] | None = None
        super().__init__(config, model=model, train_dataset=CaptionPoolDataset(pool),
                         collate_fn=collate_caption_groups)

    def prepare_model(self) -> None:
        self.model.requires_grad_(True)
        self.model.to(self.device)

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        from genalign.rewards.clip_reward import resize_shortest_and_center_crop

        from ..losses import clip_contrastive_loss

        # the renders are 32 px; a CLIP of another `resolution` sees them resized as its scores would
        pixels = resize_shortest_and_center_crop(batch["pixels"], self.model.resize_size, self.model.crop_size)
        image_features = self.model.encode_images(pixels)
        text_features = self.model.encode_text(batch["captions"])
        loss, stats = clip_contrastive_loss(image_features, text_features, self.model.clip.logit_scale,
                                            batch["image_caption"], batch["text_positive"])
        stats["logit_scale"] = self.model.clip.logit_scale.detach().exp()
        stats["images"] = float(len(batch["pixels"]))
        return loss, stats

    def on_step_end(self, step: int) -> None:
        with torch.no_grad():  # CLIP clamps the temperature at 100
            self.model.clip.logit_scale.clamp_(0, float(np.log(100.0)))

    def save_model(self, directory: Path) -> None:
        save_clip_folder(self.model, directory)

    def train(self, stop_at_step: int | None = None):
        result = super().train(stop_at_step)
        if result.final_model_dir is not None and self.config.eval_images and self.is_main:
            self.zero_shot = zero_shot_check(self.model, self.config.eval_images, seed=self.config.seed)
            logger.info("zero-shot on held-out prompts: %s", self.zero_shot)
            self._append({"step": self.state.step, **{f"zero_shot/{k}": v for k, v in self.zero_shot.items()}})
        return result

    def _append(self, record: dict[str, Any]) -> None:
        import json

        with open(self.output_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")

    @classmethod
    def from_config(cls, config: CLIPPretrainConfig, vae=None) -> CLIPPretrainTrainer:
        """Render the caption pool and build the model, then the trainer."""
        import time

        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        t0 = time.time()
        device = default_device()
        if config.autoencoder > 0 and vae is None:
            vae = load_world_autoencoder(config.autoencoder_path)
        pool = make_caption_pool(
            config.pool_groups, config.seed if config.pool_seed is None else config.pool_seed,
            template_mix=config.template_mix, hard_negatives=config.hard_negatives,
            wrong_caption=config.wrong_caption, degraded=config.degraded, quality_negatives=config.quality_negatives,
            composition_negatives=config.composition_negatives,
            autoencoder=config.autoencoder, vae=vae, workers=config.pool_workers, device=device)
        logger.info("caption pool: %d groups, %d pictures (%d quality negatives, %d autoencoded) in %.0f s",
                    len(pool), len(pool.images), int((~pool.positive).sum()), int(pool.autoencoded.sum()),
                    time.time() - t0)
        trainer = cls(config.build_world_clip(config.seed, config.resolution), config, pool)
        trainer.pool_seconds = time.time() - t0
        return trainer


# ------------------------------------------------------------------------------------------------ checks
@torch.no_grad()
def zero_shot_check(model, n: int = 512, seed: int = 0, vae=None) -> dict[str, float]:
    """Zero-shot checks of a CLIP reward on renders of HELD-OUT prompts, half of them through the autoencoder:

    - `caption`: share of pictures scored higher with their prompt than with a one-attribute-swapped prompt;
    - `image`: share of prompts that score their own picture above the picture of a swapped prompt;
    - `quality`: share of prompts that score a clean picture above a degraded copy of it."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    held = image_splits().heldout
    every = None  # hard negatives among all prompts of the language: held-out ones are not in the train split
    prompts = [rng.choice(held) for _ in range(n)]
    negatives = [hard_negative_prompt(p, rng, every) for p in prompts]
    clean = np.stack([to_uint8(render_image(p, nrng)) for p in prompts])
    other = np.stack([to_uint8(render_image(q, nrng)) for q in negatives])
    bad = np.stack([to_uint8(corrupt_image(c.astype(np.float32) / 255, rng.choice(IMAGE_CORRUPTIONS), nrng))
                    for c in clean])
    half = np.arange(n) % 2 == 1
    vae = vae if vae is not None else load_world_autoencoder()
    device = model.device
    for arr in (clean, other, bad):
        arr[half] = autoencoder_round_trip(arr[half], vae, device=device)
    with eval_mode(model):
        before = model.normalize
        model.normalize = False
        try:
            s = lambda media, ps: model.score_dict(list(media), ps)["score"].float().cpu().numpy()
            own, swapped = s(clean, prompts), s(clean, negatives)
            other_img, degraded_img = s(other, prompts), s(bad, prompts)
        finally:
            model.normalize = before
    return {"caption": float((own > swapped).mean()), "image": float((own > other_img).mean()),
            "quality": float((own > degraded_img).mean()), "n": n}


# ------------------------------------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    """`python -m genalign.world.clip_pretrain [--config RECIPE] [key=value ...]`: stage 1 alone (the recipe
    world_clip_pretrain by default); the CLIP folder is written to output_dir/clip."""
    from ..trainers.command import world_stage_main

    def report(trainer: CLIPPretrainTrainer, result) -> str:
        return f"CLIP folder at {result.final_model_dir}; zero-shot on held-out prompts: {trainer.zero_shot}"

    return world_stage_main("python -m genalign.world.clip_pretrain", __doc__.split("\n\n")[0], CLIPPretrainTrainer,
                            "world_clip_pretrain", report, argv)


if __name__ == "__main__":
    raise SystemExit(main())
