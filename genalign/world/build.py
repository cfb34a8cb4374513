"""`genalign world build`: rebuild the world's shipped base generators from scratch on a CPU.

Image model: an SD3-family pipeline (SD3Transformer2DModel + a small AutoencoderKL + two frozen random-init
CLIP text encoders with the world's word-level tokenizer, no T5), pretrained by flow matching on the imperfect
corpus. Video model: a Wan-family pipeline (WanTransformer3DModel + a frozen random-init UMT5 encoder) over the
image autoencoder applied frame by frame (see genalign.world.video_vae).
Everything is seeded; the time each stage took is written to BUILD.json next to the models.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import flow
from ..config import ConfigError
from ..files import publish_copy, publish_dir, shared_as_written
from ..models.tiny import autoencoder_kl, clip_text_encoder, sd3_transformer
from . import DEFAULT_SAMPLING
from .corpus import make_image_corpus
from .tokenizer import build_tokenizer

TEXT_DIM = 32


@dataclass
class BuildConfig:
    seed: int = 0
    image_corpus: int = 30000
    video_corpus: int = 6000
    vae_steps: int = 600
    image_steps: int = 4000
    video_steps: int = 2500
    batch_size: int = 64
    lr: float = 3e-4
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1
    threads: int = 0  # 0: torch's default
    # stage "latent-reward" (not part of the default build): pairs of the built image model, then two latent
    # reward models (noise-aware, and the clean-latent ablation) trained with this recipe
    latent_reward_pairs: int = 4096
    latent_reward_heldout_pairs: int = 1024
    latent_reward_recipe: str = "latent_reward_world"
    latent_reward_overrides: dict = field(default_factory=dict)  # recipe keys, e.g. {"max_steps": 500}
    latent_reward_workdir: str = "runs/world-build/latent-reward"  # pairs and training runs (never shipped)
    # stage "reward" (only when named; genalign.world.reward_build): the world's learned reward models. Image pairs
    # are the latent-reward stage's (same folder, seeds and counts), reused when present
    reward_kinds: tuple[str, ...] = ("image", "video")
    reward_workdir: str = "runs/world-build/reward"  # caption pool runs, video pairs, training runs (never shipped)
    # K samples per train prompt, every two a pair (`genalign world pairs --samples-per-prompt K`): 8 samples of
    # each of 1024 prompts make 28672 pairs, from the samples that 4096 two-sample pairs take
    # (docs/world-rewards.md: +2 from scratch, +2.4 to +4.7 after stage 1 over 4096 such pairs); twice that, 57344
    # from 2048 prompts, +2.6 more with the ResNet CLIP (about 42 min of sampling on one CPU core)
    reward_image_pairs: int = 57344
    reward_image_samples_per_prompt: int = 8
    # sets of reward_image_pairs train pairs, seeds seed, seed + 2, seed + 3, ... (seed + 1 makes the held-out pairs),
    # trained on together, five epochs: two sets +3.0 points over one, three +2.2 over two (docs/world-rewards.md)
    reward_image_pair_sets: int = 3
    reward_image_heldout_pairs: int = 1024
    reward_clip_recipe: str = "world_clip_pretrain"  # stage 1: the world CLIP
    # its recipe keys; 800 steps (about 42 min on one CPU core at 64 px, 25 at 32; the recipe's 2500 took 150 s on
    # an H100). Both stages read the 32-px pictures upsampled to 64 px: against 32 px, oracle agreement +1.1, ties
    # AUC 0.75 against 0.72, clean renders 91.5% against 81%, the annotators' labels the same (docs/world-rewards.md)
    reward_clip_overrides: dict = field(default_factory=lambda: {"max_steps": 800, "warmup_steps": 100,
                                                                 "composition_negatives": 0.5, "resolution": 64})
    reward_pickscore_recipe: str = "reward_pickscore_world_pretrained"  # stage 2: PickScore fine-tuning
    # 5 epochs of 3 sets (about 100 min on one CPU core at 64 px, 50 at 32)
    reward_pickscore_overrides: dict = field(default_factory=lambda: {"max_steps": 27000, "resolution": 64})
    # image reward members, each its own stage 1 and stage 2 with seed seed + j: more than one ships their mean
    # (an EnsembleReward)
    reward_image_members: int = 1
    # the from-scratch run joins that ensemble: it errs unlike the pretrained members, which err alike
    # (docs/world-rewards.md: +2.6 points of oracle agreement with it, +1.0 with a second pretrained member), but
    # reads clean renders worse
    reward_image_scratch_member: bool = False
    reward_video_pairs: int = 3072  # about 0.6 s each on 2 busy cores (sampling, oracle, MP4): 31 min
    # K > 2: every two of K clips per prompt a pair, as for images; K = 8 (12288 pairs from 3512 clips) measured no
    # better than the 3072 two-clip pairs (docs/world-rewards.md), so two stays the default
    reward_video_samples_per_prompt: int = 2
    reward_video_heldout_pairs: int = 768  # 192 resolved differences of about ten points, 768 about five
    reward_video_recipe: str = "reward_videoreward_world"
    # 16 epochs of 3072 pairs: VQ +2.2 points over 1500 steps on both 768-pair held-out sets, MQ and TA unchanged
    reward_video_overrides: dict = field(default_factory=lambda: {"max_steps": 3000})
    # video stage 0: caption pretraining of the tiny Qwen2-VL on renders (genalign.world.video_caption_pretrain),
    # the world's stand-in for the pretrained VLM VideoReward starts from; the reward stages start from its model.
    # MQ +5.1 and +7.5 points on the two 768-pair held-out sets (docs/world-rewards.md), VQ and TA within noise;
    # 30 min on one core
    reward_video_caption: bool = True
    reward_video_caption_recipe: str = "world_video_caption"
    reward_video_caption_overrides: dict = field(default_factory=dict)
    # video stage 1 (0: none): TA on render pairs (`genalign world pairs --source renders`) before the sampled
    # pairs; it lifted held-out TA from 50.4 to 59.3 (docs/world-rewards.md); 400 steps on 768 pairs after it
    # forgot it again
    reward_video_render_pairs: int = 4096
    reward_video_render_overrides: dict = field(
        default_factory=lambda: {"max_steps": 1200, "dims": {"VQ": 0, "MQ": 0, "TA": 1}})  # TA only: VQ/MQ tie there
    # stage 2 on the sampled pairs and the render pairs together (the render pairs with the dimensions stage 1
    # trained, TA), so that fitting the generator's clips does not forget the text alignment stage 1 taught
    reward_video_renders_in_stage2: bool = False
    reward_compare: bool = True  # also train PickScore from scratch and the video model with plain BT (the report)

    def __post_init__(self):
        unknown = sorted(set(self.reward_kinds) - {"image", "video"})
        if unknown:  # a misspelt kind would otherwise build nothing, silently
            raise ConfigError(f"config key 'reward_kinds': {unknown} are not reward kinds (image, video)")
        if self.reward_image_pair_sets < 1:
            raise ConfigError(f"config key 'reward_image_pair_sets': at least 1, got {self.reward_image_pair_sets}")
        if self.reward_image_members < 1:
            raise ConfigError(f"config key 'reward_image_members': at least 1, got {self.reward_image_members}")
        if self.reward_video_renders_in_stage2 and not self.reward_video_render_pairs:
            raise ConfigError("config key 'reward_video_renders_in_stage2': needs reward_video_render_pairs > 0")


def small_vae(seed: int):
    """The world's autoencoder before training: 0.17M parameters, 32x32x3 pixels -> 4x16x16 latents."""
    return autoencoder_kl(seed, scaling_factor=1.0, block_out_channels=(16, 32), norm_num_groups=8)


def image_pipeline(seed: int, vae=None):
    """A randomly initialised world image pipeline (StableDiffusion3Pipeline)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tok = build_tokenizer()
    transformer = sd3_transformer(seed, num_layers=4, attention_head_dim=32, num_attention_heads=4, text_dim=TEXT_DIM)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=vae if vae is not None else small_vae(seed),
        text_encoder=clip_text_encoder(tok, seed + 1, hidden_size=TEXT_DIM),
        tokenizer=tok,
        text_encoder_2=clip_text_encoder(tok, seed + 2, hidden_size=TEXT_DIM),
        tokenizer_2=copy.deepcopy(tok),
        text_encoder_3=None,
        tokenizer_3=None,
    )


def to_pixels(batch_uint8: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(batch_uint8).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vae(vae, images: np.ndarray, steps: int, batch_size: int, seed: int, lr: float = 1e-3) -> list[float]:
    """Reconstruction + a small KL, enough for a faithful 4x16x16 latent space of 32x32 renders."""
    g = np.random.default_rng(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    vae.train()
    losses = []
    for step in (bar := tqdm(range(steps), desc="world: autoencoder", mininterval=5)):
        x = to_pixels(images[g.integers(0, len(images), batch_size)])
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        loss = torch.nn.functional.mse_loss(recon, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def encode_raw(vae, media: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Posterior means of uint8 images (N, H, W, 3) or videos (N, F, H, W, 3), before normalisation."""
    flat = media.reshape(-1, *media.shape[-3:])
    out = torch.cat([vae.encode(to_pixels(flat[i : i + batch_size])).latent_dist.mean for i in range(0, len(flat), batch_size)])
    if media.ndim == 5:  # (N*F, C, h, w) -> (N, C, F, h, w)
        n, f = media.shape[:2]
        out = out.reshape(n, f, *out.shape[1:]).permute(0, 2, 1, 3, 4)
    return out


def pretrain_flow(
    adapter,
    latents: torch.Tensor,
    captions: list[str],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    cfg_dropout: float,
    ema_decay: float,
    desc: str,
) -> list[float]:
    """Plain flow-matching pretraining (logit-normal t) of the whole denoiser on cached latents and prompts.

    The text encoders are frozen, so each distinct caption is encoded once.
    """
    unique = sorted(set(captions))
    index = {c: i for i, c in enumerate(unique)}
    cap_idx = torch.tensor([index[c] for c in captions])
    table = {k: torch.cat([v]) for k, v in adapter.encode_prompt(unique).items()}
    empty = adapter.encode_prompt([""])
    model = adapter.denoiser
    model.train().requires_grad_(True)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, min(200, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))) * 0.9 + 0.1)
    )
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in (bar := tqdm(range(steps), desc=desc, mininterval=5)):
        idx = torch.randint(0, len(latents), (batch_size,), generator=g)
        x0 = latents[idx]
        drop = torch.rand(batch_size, generator=g) < cfg_dropout
        cond = {k: torch.where(drop.view(-1, *([1] * (v.ndim - 1))), empty[k].expand_as(v[cap_idx[idx]]), v[cap_idx[idx]])
                for k, v in table.items()}
        t = flow.sample_logit_normal(batch_size, generator=g)
        eps = torch.randn(x0.shape, generator=g)
        x_t = flow.interpolate(x0, eps, t)
        loss = torch.nn.functional.mse_loss(adapter.velocity(x_t, t, cond), flow.velocity_target(x0, eps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item())
        if step % 100 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
    model.load_state_dict(ema.state_dict())
    model.eval().requires_grad_(False)
    return losses


def set_latent_normalisation(vae, raw: torch.Tensor) -> tuple[float, float]:
    shift = float(raw.mean())
    scale = float(1.0 / raw.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return shift, scale


def build_autoencoder(out: Path, cfg: BuildConfig) -> dict:
    """Stage 1: the image autoencoder, shared by both world models (per frame for video)."""
    stats: dict = {}
    t0 = time.time()
    corpus = make_image_corpus(cfg.image_corpus, seed=cfg.seed)
    vae = small_vae(cfg.seed)
    losses = train_vae(vae, corpus.media, cfg.vae_steps, cfg.batch_size, cfg.seed)
    stats["latent_shift"], stats["latent_scale"] = set_latent_normalisation(vae, encode_raw(vae, corpus.media))
    stats["seconds"], stats["final_loss"] = time.time() - t0, float(np.mean(losses[-100:]))
    with shared_as_written(out):  # safetensors writes 0600 files (genalign.files)
        vae.save_pretrained(out, safe_serialization=True)
    return stats


def load_autoencoder(path: Path):
    from diffusers import AutoencoderKL

    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"no world autoencoder at {path}: build it first (`genalign world build --only vae`)")
    return AutoencoderKL.from_pretrained(path).eval().requires_grad_(False)


def build_image_model(out: Path, vae_dir: Path, cfg: BuildConfig) -> dict:
    """Stage 2: the SD3-family image model, pretrained on the imperfect image corpus."""
    from ..models.sd3 import SD3Adapter

    stats: dict = {}
    corpus = make_image_corpus(cfg.image_corpus, seed=cfg.seed)
    vae = load_autoencoder(vae_dir)
    raw = encode_raw(vae, corpus.media)
    pipe = image_pipeline(cfg.seed, vae=vae)
    adapter = SD3Adapter(pipe)
    latents = (raw - vae.config.shift_factor) * vae.config.scaling_factor
    t0 = time.time()
    losses = pretrain_flow(adapter, latents, corpus.captions, cfg.image_steps, cfg.batch_size, cfg.lr, cfg.seed,
                           cfg.cfg_dropout, cfg.ema_decay, "world: image model")
    stats["seconds"], stats["final_loss"] = time.time() - t0, float(np.mean(losses[-100:]))
    save_pipeline(pipe, out, DEFAULT_SAMPLING["image"])
    return stats


def save_pipeline(pipe, out: Path, sampling: dict | None = None) -> None:
    """Write a pipeline folder atomically (temp folder, then rename) in safetensors."""
    import shutil

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    if sampling is not None:
        (tmp / "genalign_sampling.json").write_text(json.dumps(sampling, indent=2))
    publish_dir(tmp, out)


STAGES = ("vae", "image", "video")
# Stages run only when named (`--only latent-reward`): they need a built image model and add a model on top.
EXTRA_STAGES = ("latent-reward", "reward", "aligned")


def build_world(out_dir: Path, cfg: BuildConfig, which: tuple[str, ...] = STAGES) -> dict:
    """Run the build stages in order; each writes its folder atomically and its timing to BUILD.json.

    `vae` must exist before `image` and `video`, which are independent of each other (two processes may
    build them at once: `--only image` and `--only video`)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {}
    for kind in which:
        t0 = time.time()
        if kind == "vae":
            stats = build_autoencoder(out_dir / "autoencoder", cfg)
        elif kind == "image":
            stats = build_image_model(out_dir / "image-base", out_dir / "autoencoder", cfg)
        elif kind == "video":
            from .video import build_video_model

            stats = build_video_model(out_dir / "video-base", out_dir / "autoencoder", cfg)
        elif kind == "latent-reward":
            stats = build_latent_reward(out_dir, cfg)
        elif kind == "aligned":
            from .aligned_build import build_aligned_lora

            stats = build_aligned_lora(out_dir, cfg)
        elif kind == "reward":
            from .reward_build import build_reward_models

            stats = build_reward_models(out_dir, cfg)
        else:
            raise ValueError(f"unknown build stage {kind!r} (one of {', '.join(STAGES + EXTRA_STAGES)})")
        stats["total_s"] = time.time() - t0
        report[kind] = {"config": asdict(cfg), "stats": stats, "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "machine": platform.machine()}
        report[kind] = _merge_report(out_dir / "BUILD.json", kind, report[kind])
    return report


def _merge_report(path: Path, kind: str, entry: dict) -> dict:
    """Add one stage's entry to BUILD.json (stages may finish in separate processes); returns the entry written.
    A reward build of some kinds keeps the record of the others (reward_build.merge_reward_entry)."""
    report = json.loads(path.read_text()) if path.exists() else {}
    if kind == "reward":
        from .reward_build import merge_reward_entry

        entry = merge_reward_entry(report.get("reward"), entry, entry["config"]["reward_kinds"])
    report[kind] = entry
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(path)
    return entry


# ------------------------------------------------------------------------------------------------ latent reward
LATENT_REWARD_MAX_BYTES = 2_000_000  # the shipped noise-aware model must stay small
LATENT_REWARD_CLEAN_MAX_BYTES = 1_000_000  # the clean ablation is shipped only below this


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def build_latent_reward(out: Path, cfg: BuildConfig) -> dict:
    """Stage `latent-reward`: the noise-aware latent reward model (VQ, TA) of the world's image model for
    Flow-NRG, and its clean-latent ablation (paper Table 7), shipped as `image-latent-reward/` and (if under
    1 MB) `image-latent-reward-clean/`.

    1. pairs of `out/image-base` (reused when already in the work folder): `latent_reward_pairs` training
       pairs (seed `seed`) and `latent_reward_heldout_pairs` held-out pairs (seed `seed + 1`);
    2. two runs of `genalign train latent-reward --config <latent_reward_recipe>`: noise_aware=true and false;
    3. their held-out accuracies per dimension and t (against the oracle) go to BUILD.json."""
    import shutil

    from ..config import load_config
    from ..recipes import recipe_path
    from ..trainers.latent_reward import LatentRewardTrainConfig, LatentRewardTrainer
    from . import ASSETS, LATENT_REWARD_DIRS
    from .reward_build import make_pairs

    command = "genalign world build --only latent-reward"
    defaults = BuildConfig()
    for key in ("seed", "threads", "latent_reward_pairs", "latent_reward_heldout_pairs", "latent_reward_recipe",
                "latent_reward_workdir", "latent_reward_overrides"):
        if getattr(cfg, key) != getattr(defaults, key):
            value = getattr(cfg, key)
            command += f" '{key}={json.dumps(value) if isinstance(value, dict) else value}'"
    stats: dict = {"command": command}
    work = Path(cfg.latent_reward_workdir)
    model_dir = Path(out) / "image-base"
    if not (model_dir / "model_index.json").is_file():
        raise FileNotFoundError(f"no world image model at {model_dir}: build it first (`genalign world build --only image`)")
    shipped_model = model_dir.resolve() == (ASSETS / "image-base").resolve()
    model_arg = "world" if shipped_model else str(model_dir)  # as recorded in BUILD.json
    data = {}
    for split, n, seed in (("train", cfg.latent_reward_pairs, cfg.seed), ("heldout", cfg.latent_reward_heldout_pairs,
                                                                           cfg.seed + 1)):
        folder = work / f"pairs-{split}"
        parquet = folder / "pairs.parquet"
        t0, c0 = time.time(), time.process_time()
        reused = parquet.is_file() and _num_rows(parquet) == n
        if not reused:
            make_pairs(model_dir, "image", n, split, seed, folder)
        data[split] = str(parquet)
        stats[f"pairs_{split}"] = {"path": str(parquet), "pairs": n, "seed": seed, "reused": reused,
                                   "seconds": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1),
                                   "command": "genalign world pairs --kind image "
                                              + ("" if shipped_model else f"--model {model_dir} ") + f"--num-pairs {n} "
                                              f"--split {split} --seed {seed} --out {folder}"}
    recipe = cfg.latent_reward_recipe
    recipe_file = recipe if Path(recipe).is_file() else str(recipe_path(recipe))
    for name, clean in (("noise_aware", False), ("clean", True)):
        run_dir = work / name.replace("_", "-")
        if run_dir.exists():
            shutil.rmtree(run_dir)
        overrides = [f"model={model_arg}", f"data={data['train']}", f"eval_data={data['heldout']}",
                     f"output_dir={run_dir}", f"noise_aware={'false' if clean else 'true'}", f"seed={cfg.seed}",
                     "progress_bar=false"]
        overrides += [f"{k}={_override_text(v)}" for k, v in cfg.latent_reward_overrides.items()]
        if cfg.threads:
            overrides.append(f"num_threads={cfg.threads}")
        t0, c0 = time.time(), time.process_time()
        trainer = LatentRewardTrainer.from_config(load_config(LatentRewardTrainConfig, recipe_file, overrides))
        result = trainer.train()
        final = Path(result.final_model_dir)
        size = _folder_bytes(final)
        limit = LATENT_REWARD_CLEAN_MAX_BYTES if clean else LATENT_REWARD_MAX_BYTES
        target = Path(out) / LATENT_REWARD_DIRS[("image", clean)]
        shipped = size < limit
        if shipped:
            publish_copy(final, target)
        elif not clean:
            raise RuntimeError(f"the noise-aware latent reward model has {size} bytes, over the {limit}-byte limit "
                               "of a shipped asset: make it smaller in the recipe (hidden, depth)")
        ev = trainer.eval_result or {}
        stats[name] = {
            "recipe": recipe, "overrides": overrides, "seconds": round(time.time() - t0, 1),
            "cpu_s": round(time.process_time() - c0, 1), "bytes": size,
            "shipped": str(target.name) if shipped else None, "train_run": str(run_dir),
            "final_metrics": {k: v for k, v in result.last_metrics.items() if isinstance(v, (int, float))},
            "heldout_pairs": ev.get("pairs"), "eval_tie_margin": ev.get("tie_margin"),
            # held-out pairwise accuracy vs the oracle's per-dimension preference, per dim and t: both items noised
            # with the same noise (as in training) / independently; and against the annotators' overall label
            "accuracy": {d: {t: {k: m.get(k) for k in ("oracle", "oracle_independent", "labels", "oracle_pairs")}
                             for t, m in per_t.items()} for d, per_t in ev.get("accuracy", {}).items()},
        }
    return stats


def _override_text(value) -> str:
    """A recipe override value as `key=value` text (lists comma-separated, mappings as JSON)."""
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _num_rows(parquet: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(parquet).metadata.num_rows
    except Exception:  # noqa: BLE001 - an unreadable file is regenerated
        return -1
