"""Stage 0 of the world's VideoReward: the tiny Qwen2-VL learns to caption rendered clips.

VideoReward (arXiv 2501.13918) fine-tunes Qwen2-VL-2B, a vision-language model that already reads colours, shapes
and motion from video tokens because it was pretrained to describe videos in words. The world's Qwen2-VL is random
at first, and the preference pairs alone did not teach it to read the prompt against the clip: trained on them, its
text alignment (TA) stayed near chance (57% against an 87% ceiling) while VQ and MQ reached 85 and 78; a first stage
on clean render pairs (a prompt's clip against a one-attribute-swapped prompt's) stalled at its starting loss.
This module is the world's analogue of that pretraining, as `clip_pretrain` is for the PickScore model: next-token
prediction of the caption after the clip, in the reward's own template (`{video} ... Prompt: {caption}`), so the
language model learns to attend from the prompt's words to the video tokens that show them.

- The clips: renders of train-split video prompts (held-out prompts are never rendered), drawn per item from a
  seed, so a run is the same however it is resumed; `motion_flaws` of them shake around their track
  (`render.jitter_video`), `degraded` flicker (`render.flicker_video`), `autoencoder` go through the world
  autoencoder's round trip frame by frame (the video generator decodes its frames with it). All keep their
  caption: colour, shape and direction are still what the prompt says.
- The output layer is the input embedding table, transposed (tied weights): nothing is added to the model, and
  the folder written is a VideoReward folder (`output_dir/reward_model`) that `genalign train reward --kind
  videoreward model=<that folder>` fine-tunes. Its head is untouched (random): the reward stages train it.
- At the end, `caption_check` scores renders against held-out prompts (half through the autoencoder): per
  attribute, the share of prompts whose own clip is the most likely to be captioned by them among clips with that
  attribute set to every value.

    from genalign.world.video_caption_pretrain import VideoCaptionConfig, VideoCaptionTrainer
    trainer = VideoCaptionTrainer.from_config(VideoCaptionConfig(output_dir="runs/world-video-caption"))
    trainer.train()                            # runs/world-video-caption/reward_model/
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..trainers.loop import TrainConfig, Trainer, eval_mode, option
from ..trainers.reward import WorldVideoSize
from .clip_pretrain import autoencoder_round_trip, load_world_autoencoder
from .grammar import COLORS, DIRECTIONS, SHAPES, parse_prompt, split_prompts
from .render import flicker_video, jitter_video, render_cluttered_video, render_video, to_uint8

logger = logging.getLogger("genalign.world")

ATTRIBUTES = ("color", "shape", "direction")


@dataclass
class VideoCaptionConfig(WorldVideoSize, TrainConfig):
    output_dir: str = option("runs/world-video-caption", "run folder: checkpoints, metrics.jsonl, config.yaml, "
                                                         "reward_model/")
    max_steps: int = option(1500, "optimizer steps")
    batch_size: int = option(32, "clips per batch")
    lr: float = option(3e-4, "peak learning rate (AdamW)")
    lr_scheduler: str = option("cosine", "LR schedule after warmup")
    warmup_steps: int = option(100, "linear warmup steps")
    weight_decay: float = option(0.01, "AdamW weight decay")
    checkpoint_every: int = option(500, "checkpoint every N steps")
    keep_checkpoints: int = option(1, "checkpoints kept")
    log_every: int = option(50, "log every N steps")
    clips: int = option(0, "clips drawn, each from its own seed (0: max_steps x batch_size: every clip seen once)")
    motion_flaws: float = option(0.2, "share of moving clips whose object shakes around its track")
    degraded: float = option(0.2, "share of clips with per-frame brightness and noise flicker")
    autoencoder: float = option(0.5, "share of clips passed through the world autoencoder's round trip")
    cluttered: float = option(0.0, "share of clips with the video generator's flaws around the prompt's object "
                                   "(smaller distractor objects, frames without it: render.render_cluttered_video)")
    autoencoder_path: str | None = option(None, "the autoencoder folder (None: the shipped world autoencoder)")
    fps: float = option(8.0, "fps stored with the model (the world's clips: 8)")
    num_frames: int = option(8, "frames per clip")
    max_prompt_tokens: int = option(32, "prompt tokens kept")
    eval_clips: int = option(256, "held-out-prompt renders for the caption check at the end (0: none)")

    def __post_init__(self):
        super().__post_init__()
        for key in ("motion_flaws", "degraded", "autoencoder", "cluttered"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"config key {key!r}: must be in [0, 1], got {getattr(self, key)}")
        for key in ("clips", "eval_clips"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key {key!r}: must be >= 0, got {getattr(self, key)}")

    def reward_settings(self) -> dict[str, Any]:
        """The VideoRewardConfig of the model: the world recipe's (`reward_videoreward_world`) input settings."""
        return {"fps": self.fps, "num_frames": self.num_frames, "frame_size": (32, 32), "lora_rank": 0,
                "train_vision": True, "max_prompt_tokens": self.max_prompt_tokens}


# ------------------------------------------------------------------------------------------------ the clips
class CaptionedClips(torch.utils.data.Dataset):
    """`n` captioned clips of train-split prompts; clip i is drawn from the seed (seed, i) (module docstring)."""

    def __init__(self, n: int, seed: int = 0, motion_flaws: float = 0.2, degraded: float = 0.2,
                 autoencoder: float = 0.5, frames: int = 8, prompts: list[str] | None = None, cluttered: float = 0.0):
        self.n, self.seed, self.frames, self.cluttered = n, seed, frames, cluttered
        self.motion_flaws, self.degraded, self.autoencoder = motion_flaws, degraded, autoencoder
        self.prompts = prompts if prompts is not None else split_prompts("video", "train")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, i])
        prompt = self.prompts[int(rng.integers(len(self.prompts)))]
        # (no draw when cluttered = 0: the clips are then those of the runs made before the option existed)
        if self.cluttered and rng.random() < self.cluttered:
            clip = render_cluttered_video(prompt, rng, self.frames, distractors=int(rng.integers(1, 4)),
                                          dropped_frames=int(rng.integers(0, 3)))
        elif rng.random() < self.motion_flaws and not prompt.endswith("still"):
            clip = jitter_video(prompt, int(rng.integers(1 << 31)), frames=self.frames)
        else:
            clip = render_video(prompt, rng, frames=self.frames)
        if rng.random() < self.degraded:
            clip = flicker_video(clip, rng)
        return {"clip": to_uint8(clip), "caption": prompt, "autoencode": bool(rng.random() < self.autoencoder)}


class CollateClips:
    """Items -> {"pixels": float (B, F, 3, H, W) in [0, 1], "captions": [B]}; the flagged clips go through the
    autoencoder's round trip, frame by frame (all of a batch's frames in one call)."""

    def __init__(self, vae=None, device: str | torch.device = "cpu"):
        self.vae, self.device = vae, device

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        clips = np.stack([it["clip"] for it in items])  # (B, F, H, W, 3) uint8
        flagged = np.array([it["autoencode"] for it in items], dtype=bool)
        if flagged.any():
            if self.vae is None:
                raise ValueError("clips flagged for the autoencoder's round trip but no autoencoder was given")
            picked = clips[flagged]
            frames = autoencoder_round_trip(picked.reshape(-1, *picked.shape[2:]), self.vae, device=self.device)
            clips[flagged] = frames.reshape(picked.shape)
        pixels = torch.from_numpy(clips).permute(0, 1, 4, 2, 3).float() / 255.0
        return {"pixels": pixels, "captions": [it["caption"] for it in items]}


# ------------------------------------------------------------------------------------------------ the loss
def caption_token_log_probs(model, pixels, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every caption token given the clip and the tokens before it, in the reward's template,
    with the input embeddings as the output layer: (log_probs (N,), item index (N,)) over the N caption tokens of
    the batch. `model`: a VideoReward; `pixels`: its clips (a batch tensor or a list, [0, 1])."""
    hidden, text = model.last_hidden_states(list(pixels), captions)
    rows, positions = [], []
    for i, (start, end) in enumerate(text["prompt_spans"]):
        rows += [i] * (end - start)
        positions += range(start, end)
    rows_t = torch.tensor(rows, device=hidden.device)
    positions_t = torch.tensor(positions, device=hidden.device)
    targets = text["input_ids"].to(hidden.device)[rows_t, positions_t]
    embeddings = model.base_model.get_input_embeddings().weight
    logits = hidden[rows_t, positions_t - 1].to(embeddings.dtype) @ embeddings.T  # the token before predicts it
    log_probs = F.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]
    return log_probs, rows_t


def caption_loss(model, pixels, captions: list[str]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mean negative log-likelihood of the caption tokens (`caption_token_log_probs`)."""
    log_probs, _ = caption_token_log_probs(model, pixels, captions)
    return -log_probs.mean(), {"token_nll": (-log_probs).mean().detach()}


@torch.no_grad()
def caption_log_likelihood(model, pixels, captions: list[str], batch_size: int = 64) -> torch.Tensor:
    """Summed log-probability of each caption given its clip: (B,)."""
    out = []
    for i in range(0, len(captions), batch_size):
        log_probs, rows = caption_token_log_probs(model, pixels[i:i + batch_size], captions[i:i + batch_size])
        out.append(torch.zeros(len(captions[i:i + batch_size]), device=log_probs.device).index_add_(0, rows, log_probs))
    return torch.cat(out).cpu()


# ------------------------------------------------------------------------------------------------ the trainer
class VideoCaptionTrainer(Trainer):
    """Caption pretraining of a world VideoReward; the final model is `output_dir/reward_model/`."""

    config_class = VideoCaptionConfig
    model_subdir = "reward_model"

    def __init__(self, model, config: VideoCaptionConfig, vae=None):
        if not isinstance(config, VideoCaptionConfig):
            raise TypeError(f"config must be a VideoCaptionConfig, got {type(config).__name__}")
        clips = CaptionedClips(config.clips or config.max_steps * config.batch_size * config.grad_accum, config.seed,
                               config.motion_flaws, config.degraded, config.autoencoder, config.num_frames,
                               cluttered=config.cluttered)
        self.caption_accuracy: dict[str, float] | None = None
        self.vae = vae
        super().__init__(config, model=model, train_dataset=clips, collate_fn=CollateClips(vae))

    def prepare_model(self) -> None:
        self.model.requires_grad_(True)
        self.model.head.requires_grad_(False)  # the reward head: trained by the reward stages, not here
        self.model.to(self.device)
        self.collate_fn.device = self.device

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        return caption_loss(self.model, batch["pixels"], batch["captions"])

    def save_model(self, directory: Path) -> None:
        self.model.save_pretrained(directory)

    def train(self, stop_at_step: int | None = None):
        result = super().train(stop_at_step)
        if result.final_model_dir is not None and self.config.eval_clips and self.is_main:
            self.caption_accuracy = caption_check(self.model, self.config.eval_clips, seed=self.config.seed,
                                                  vae=self.vae)
            logger.info("caption check on held-out prompts: %s", self.caption_accuracy)
            with open(self.output_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps({"step": self.state.step,
                                     **{f"caption_check/{k}": v for k, v in self.caption_accuracy.items()}}) + "\n")
        return result

    @classmethod
    def from_config(cls, config: VideoCaptionConfig, vae=None) -> VideoCaptionTrainer:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        if config.autoencoder > 0 and vae is None:
            vae = load_world_autoencoder(config.autoencoder_path)
        torch.manual_seed(config.seed)
        model = config.build_world_video_reward(config.seed, config.reward_settings())
        return cls(model, config, vae)


# ------------------------------------------------------------------------------------------------ checks
def with_attribute(prompt: str, attribute: str, value: str) -> str:
    """A video prompt with its colour, shape or direction replaced."""
    spec = parse_prompt(prompt)
    obj = spec.objects[0]
    color, shape, direction = obj.color, obj.shape, spec.direction
    if attribute == "color":
        color = value
    elif attribute == "shape":
        shape = value
    elif attribute == "direction":
        direction = value
    else:
        raise ValueError(f"unknown attribute {attribute!r} (known: {ATTRIBUTES})")
    return f"{color} {shape} moving {direction}"


@torch.no_grad()
def caption_check(model, n: int = 256, seed: int = 0, vae=None) -> dict[str, float]:
    """Per attribute, the share of held-out prompts whose own clip is the most likely to be captioned by them among
    clips with that attribute set to each value (same background and layout; every other prompt's clips through the
    autoencoder's round trip). Clips compete for one caption, as two samples of one prompt do in a reward's pair;
    captions competing for one clip would also weigh the language prior, which has never seen a held-out
    prompt's combination of colour, shape and direction."""
    values = {"color": list(COLORS), "shape": list(SHAPES), "direction": list(DIRECTIONS)}
    rng = np.random.default_rng(seed + 7919)
    held = split_prompts("video", "heldout")
    prompts = [held[int(rng.integers(len(held)))] for _ in range(n)]
    vae = vae if vae is not None else load_world_autoencoder()
    out = {}
    with eval_mode(model):
        for attribute, options in values.items():
            right = 0
            for i, prompt in enumerate(prompts):
                candidates = [with_attribute(prompt, attribute, v) for v in options]
                items = [{"clip": to_uint8(render_video(c, np.random.default_rng([seed, i]))), "caption": prompt,
                          "autoencode": i % 2 == 1} for c in candidates]
                batch = CollateClips(vae, device=model.device)(items)
                ll = caption_log_likelihood(model, batch["pixels"], batch["captions"])
                right += int(candidates[int(ll.argmax())] == prompt)
            out[attribute] = right / n
    out["n"] = n
    return out


# ------------------------------------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    """`python -m genalign.world.video_caption_pretrain [--config RECIPE] [key=value ...]`: stage 0 alone (the
    recipe world_video_caption by default); the model folder is written to output_dir/reward_model."""
    from ..trainers.command import world_stage_main

    def report(trainer: VideoCaptionTrainer, result) -> str:
        return (f"model folder at {result.final_model_dir}; caption check on held-out prompts: "
                f"{trainer.caption_accuracy}")

    return world_stage_main("python -m genalign.world.video_caption_pretrain", __doc__.split("\n\n")[0],
                            VideoCaptionTrainer, "world_video_caption", report, argv)


if __name__ == "__main__":
    raise SystemExit(main())
