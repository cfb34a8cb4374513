"""Flow-DPO: offline preference optimisation of a flow-matching generator with a LoRA adapter.

Liu et al., "Improving Video Generation with Human Feedback", arXiv 2501.13918 (ALGORITHMS.md section 1); the
loss itself is `genalign.losses.flow_dpo_loss`. Per optimizer step, for a batch of pairs (prompt, winner, loser):

1. latents: from the latent cache when the dataset is one (`genalign cache`), else `adapter.encode_pixels`;
   pairs labelled "B wins" are swapped so the winner comes first; ties follow `tie_policy`;
2. one noise `eps` and one timestep `t` per pair (logit-normal by default), SHARED by winner and loser;
3. the reference velocity (no gradient): the same network with the LoRA switched off (default), the LoRA as it
   was at the start / at the last refresh (online DPO), or a separate model;
4. the trained velocity for winners and losers in ONE batched forward (winners and losers concatenated along
   the batch), per-sample flow-matching errors, and the loss.

Works for every adapter (SD3, FLUX, Wan, and UNet models through the epsilon -> velocity conversion of
`genalign.models.unet`): the trainer only calls `encode_prompt`, `encode_pixels` and `velocity`.

    from genalign.trainers import FlowDPOConfig, FlowDPOTrainer
    trainer = FlowDPOTrainer(adapter, FlowDPOConfig(output_dir="runs/dpo", beta=100), dataset)
    trainer.train()
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import flow
from ..config import ConfigError, load_config
from ..losses.flow_dpo import BETA_SCHEDULES, DIVERGENCES, beta_at, flow_dpo_loss, per_sample_mse
from .loop import TrainConfig, Trainer, eval_mode, option

REFERENCES = ("disabled_adapter", "adapter", "model")
TIE_POLICIES = ("drop", "half", "keep_first")
TIMESTEP_SAMPLERS = ("logit_normal", "uniform")
logger = logging.getLogger("genalign.trainers")


@dataclass
class FlowDPOConfig(TrainConfig):
    output_dir: str = option("runs/flow-dpo", "run folder: checkpoints, metrics.jsonl, config.yaml, the final LoRA")
    model: str | None = option("world", "diffusers pipeline folder or cached hub id (SD3, FLUX, Wan, SD1.5/SDXL); "
                                 "'world' / 'world-video': the built-in world's base models")
    data: str | None = option(None, "preference pairs (Pick-a-Pic parquet, VideoAlign CSV, jsonl, folder layout) or "
                                    "a latent cache folder made by `genalign cache` (used as is when given)")
    resolution: int | None = option(None, "resize + centre-crop media to this square size (None: use them as they "
                                          "are; they must then share one size)")
    num_frames: int | None = option(None, "videos: sample this many frames uniformly (None: all)")
    max_sequence_length: int | None = option(None, "text tokens for the T5-type encoder (None: the model's default)")
    beta: float = option(100.0, "DPO strength. Convention: z = -(beta/2) [(D_theta(w) - D_ref(w)) - (D_theta(l) - "
                                "D_ref(l))], D = per-sample MSE of the velocity. The public SD3.5-M code uses 100 "
                                "in this convention; code written as -beta * diff needs beta/2 of ours")
    beta_schedule: str = option("constant", "constant (default, recommended) | one_minus_t_sq: beta_t = beta (1-t)^2, "
                                            "the literal Diffusion-DPO carry-over (reward-hacks: paper Table 4)")
    divergence: str = option("reverse_kl", "reverse_kl (= Flow-DPO) | forward_kl | js | alpha (f-DPO, arXiv 2309.16240)")
    divergence_alpha: float = option(0.5, "alpha of the alpha-divergence, 0 < alpha < 1")
    timestep_sampling: str = option("logit_normal", "logit_normal (SD3's) | uniform")
    logit_mean: float = option(0.0, "mean of the logit-normal timestep distribution")
    logit_std: float = option(1.0, "std of the logit-normal timestep distribution")
    lora_rank: int = option(16, "LoRA rank")
    lora_alpha: float | None = option(None, "LoRA alpha (None: = rank, scale 1)")
    lora_targets: tuple[str, ...] | None = option(None, "LoRA target modules, comma-separated (None: the family's "
                                                        "attention projections)")
    lora_dropout: float = option(0.0, "LoRA dropout")
    reference: str = option("disabled_adapter", "disabled_adapter (the network without its LoRA; no second copy) | "
                                                "adapter (the LoRA's weights at the start, refreshed every "
                                                "reference_refresh_every steps: online DPO) | model (reference_model_path)")
    reference_refresh_every: int = option(0, "reference=adapter: copy the current LoRA into the reference every N steps "
                                             "(0: never)")
    reference_model_path: str | None = option(None, "reference=model: a pipeline folder of the same family and latent "
                                                          "space (its text encoders are loaded only if they differ "
                                                          "from those of the batches' embeddings)")
    tie_policy: str = option("drop", "ties in the data: drop | half (label 0.5, symmetric loss) | keep_first (as A wins)")
    sft_weight: float = option(0.0, "add sft_weight x the winners' flow-matching error to the loss (0: plain "
                                    "Flow-DPO); keeps the winners' likelihood from falling with the losers' (RPO)")
    online_prompts: str | None = option(None, "online pairs instead of `data`: 'world' (the world's training prompts) "
                                              "or a text file with one prompt per line; each round samples online_k "
                                              "outputs per prompt from the current model and keeps best vs worst")
    online_rounds: int = option(1, "online: rounds of (sample pairs from the current model, train max_steps/rounds "
                                   "steps); the reference is the model at the start of each round")
    online_prompts_per_round: int = option(512, "online: prompts drawn (with replacement) per round")
    online_k: int = option(8, "online: candidates sampled per prompt")
    online_scorer: str = option("world", "online: 'world' (the oracle score the simulated annotators see) or a "
                                         "genalign reward model folder")

    def __post_init__(self):
        super().__post_init__()
        choices = {"beta_schedule": BETA_SCHEDULES, "divergence": DIVERGENCES, "timestep_sampling": TIMESTEP_SAMPLERS,
                   "reference": REFERENCES, "tie_policy": TIE_POLICIES}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"config key {key!r}: must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if self.beta <= 0:
            raise ConfigError(f"config key 'beta': must be > 0, got {self.beta}")
        if self.divergence == "alpha" and not 0 < self.divergence_alpha < 1:
            raise ConfigError(f"config key 'divergence_alpha': must be in (0, 1), got {self.divergence_alpha}")
        if self.reference == "model" and not self.reference_model_path:
            raise ConfigError("config key 'reference_model_path': needed with reference=model")
        if self.reference_refresh_every and self.reference != "adapter":
            raise ConfigError("config key 'reference_refresh_every': only used with reference=adapter")
        if self.sft_weight < 0:
            raise ConfigError(f"config key 'sft_weight': must be >= 0, got {self.sft_weight}")
        if self.lora_rank < 1:
            raise ConfigError(f"config key 'lora_rank': must be >= 1, got {self.lora_rank}")
        if self.online_prompts:
            for key in ("online_rounds", "online_prompts_per_round"):
                if getattr(self, key) < 1:
                    raise ConfigError(f"config key {key!r}: must be >= 1, got {getattr(self, key)}")
            if self.online_k < 2:
                raise ConfigError(f"config key 'online_k': best vs worst needs >= 2 candidates, got {self.online_k}")
            if self.online_rounds > self.max_steps:
                raise ConfigError(f"config key 'online_rounds': {self.online_rounds} rounds need max_steps >= rounds "
                                  f"(max_steps={self.max_steps})")


# ------------------------------------------------------------------------------------------------ batches
class PreferenceCollator:
    """Turns dataset items into a training batch. Items may be

    - `PreferencePair`s (from `genalign.data.load_preference_pairs`) or dicts with `media_a`/`media_b` uint8
      arrays: -> `pixels_a`, `pixels_b` in [-1, 1] (resized to `resolution` when given);
    - dicts with `latents_a`/`latents_b` (a latent cache, `genalign.data.load_cache`), optionally with `cond`
      (cached text embeddings): -> stacked as they are.

    Always: `prompt` (list of str) and `label` (B,) float32, 1 = A wins, 0 = B wins, 0.5 = tie.
    A class rather than a closure so that DataLoader workers can pickle it.
    """

    def __init__(self, resolution: int | None = None, num_frames: int | None = None):
        self.resolution, self.num_frames = resolution, num_frames

    def _pixels(self, media: np.ndarray) -> torch.Tensor:
        from ..data.media import sample_frames, to_pixels

        if self.num_frames and media.ndim == 4:
            media = sample_frames(media, self.num_frames)
        return to_pixels(media, self.resolution)

    def __call__(self, items: list) -> dict[str, Any]:
        first = items[0]
        as_dicts = [it if isinstance(it, dict) else {"prompt": it.prompt, "media_a": it.media_a,
                                                     "media_b": it.media_b, "label": it.label} for it in items]
        batch: dict[str, Any] = {
            "prompt": [d["prompt"] for d in as_dicts],
            "label": torch.tensor([float(d["label"]) for d in as_dicts], dtype=torch.float32),
        }
        if isinstance(first, dict) and "latents_a" in first:
            batch["latents_a"] = torch.stack([d["latents_a"] for d in as_dicts])
            batch["latents_b"] = torch.stack([d["latents_b"] for d in as_dicts])
            if "cond" in first:
                batch["cond"] = {k: torch.stack([d["cond"][k] for d in as_dicts]) for k in first["cond"]}
            return batch
        for side in ("a", "b"):
            pix = [self._pixels(d[f"media_{side}"]) for d in as_dicts]
            shapes = {tuple(p.shape) for p in pix}
            if len(shapes) > 1:
                raise ValueError(f"media of different sizes in one batch ({sorted(shapes)}): set resolution=N "
                                 "(and num_frames=F for videos) to resize them")
            batch[f"pixels_{side}"] = torch.stack(pix)
        return batch


@torch.no_grad()
def pair_latents(adapter, batch: dict[str, Any], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents of A, latents of B) of a `PreferenceCollator` batch in the adapter's normalised latent space,
    float32: the cached latents as they are, else both sides' pixels encoded in one VAE call."""
    if "latents_a" in batch:
        return batch["latents_a"].float(), batch["latents_b"].float()
    pixels = torch.cat([batch["pixels_a"], batch["pixels_b"]])
    latents = adapter.encode_pixels(pixels.to(device if device is not None else adapter.device)).float()
    return latents.chunk(2)


# ------------------------------------------------------------------------------------------------ trainer
class FlowDPOTrainer(Trainer):
    """Flow-DPO (arXiv 2501.13918) with a LoRA on `adapter`'s denoiser.

    adapter: a `genalign.models.FlowAdapter`. Unless its denoiser already carries a trainable LoRA (one you
    attached with `adapter.add_lora`), the denoiser is frozen and a LoRA is attached from the config
    (lora_rank, lora_alpha, lora_targets, lora_dropout). Only the LoRA is trained.
    dataset: preference pairs or a latent cache (see `PreferenceCollator` for the accepted items).
    reference_adapter: the reference model for reference="model" (loaded from reference_model_path if None).
    """

    config_class = FlowDPOConfig
    model_subdir = "lora"  # diffusers LoRA format: pipe.load_lora_weights(output_dir / "lora")

    def __init__(self, adapter, config: FlowDPOConfig, dataset, reference_adapter=None):
        if not isinstance(config, FlowDPOConfig):
            raise TypeError(f"config must be a FlowDPOConfig, got {type(config).__name__}")
        self.adapter = adapter
        self.reference_adapter = reference_adapter
        self.reference_snapshot: dict[str, torch.Tensor] | None = None
        self.reference_shares_text_encoding = False  # reference=model: it reads the batches' prompt embeddings
        super().__init__(config, model=adapter.denoiser, train_dataset=dataset,
                         collate_fn=PreferenceCollator(config.resolution, config.num_frames))
        if config.reference == "adapter":
            self.reference_snapshot = self._snapshot()
        self.tie_policy = config.tie_policy

    # ------------------------------------------------------------------------------------- setup
    def prepare_model(self) -> None:
        from ..models.base import LoraSpec

        cfg, adapter = self.config, self.adapter
        has_lora = getattr(adapter.denoiser, "_hf_peft_config_loaded", False)
        if not (has_lora and any(p.requires_grad for p in adapter.denoiser.parameters())):
            adapter.denoiser.requires_grad_(False)  # the base weights are the (implicit) reference: frozen
            adapter.add_lora(LoraSpec(rank=cfg.lora_rank, alpha=cfg.lora_alpha, target_modules=cfg.lora_targets,
                                      dropout=cfg.lora_dropout))
        adapter.to(self.device)
        if self.weight_dtype != torch.float32:
            # Frozen weights in the half dtype (memory), trainable ones restored bit for bit in float32 after.
            trainable = {n: p.detach().float().clone() for n, p in adapter.denoiser.named_parameters() if p.requires_grad}
            for module in [adapter.denoiser, *adapter.text_encoders(), getattr(adapter.pipe, "vae", None)]:
                if module is not None:
                    module.to(self.weight_dtype)
            with torch.no_grad():
                for n, p in adapter.denoiser.named_parameters():
                    if n in trainable:
                        p.data = trainable[n]
        if cfg.reference == "model":
            if self.reference_adapter is None:
                self.reference_adapter = self._load_reference_model()
            else:
                self.reference_shares_text_encoding = self._encodes_like_the_batches(self.reference_adapter)
            ref = self.reference_adapter
            ref.to(self.device)
            ref.denoiser.requires_grad_(False).eval()
            if self.weight_dtype != torch.float32:
                ref.denoiser.to(self.weight_dtype)

    # ------------------------------------------------------------------------------------- reference
    def _batches_text_encoding(self) -> dict[str, Any]:
        """The fingerprint (data.cache.model_fingerprint) of the model whose text encoders made the batches'
        prompt embeddings: the latent cache's, or the policy's own."""
        from ..data.cache import model_fingerprint

        manifest = getattr(self.train_dataset, "manifest", None)
        if isinstance(manifest, dict) and manifest.get("model"):
            return manifest["model"]
        return model_fingerprint(self.adapter)

    def _encodes_like_the_batches(self, reference) -> bool:
        """Whether `reference` turns prompts into the same embeddings as the batches carry."""
        from ..data.cache import encodes_prompts_alike, model_fingerprint

        return encodes_prompts_alike(self._batches_text_encoding(), model_fingerprint(reference))

    def _load_reference_model(self):
        """reference=model: the reference pipeline at reference_model_path. A reference fine-tuned from the same
        base shares its text encoders (SD3.5's T5-XXL alone is 4.7 B parameters): built empty, checked against the
        encoders the batches' embeddings came from, and released; the reference then reads the batches'
        embeddings. Only a reference that encodes differently loads its own and encodes each batch's prompts."""
        from ..models import load_adapter

        cfg = self.config
        extra = {"max_sequence_length": cfg.max_sequence_length} if cfg.max_sequence_length else {}
        ref = load_adapter(cfg.reference_model_path, text_encoders="empty", **extra)
        if self._encodes_like_the_batches(ref):
            ref.release_text_encoders()
            self.reference_shares_text_encoding = True
            return ref
        logger.info("reference model %s encodes prompts differently from the batches' embeddings: loading its own "
                    "text encoders", cfg.reference_model_path)
        return load_adapter(cfg.reference_model_path, **extra)

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.named_trainable}

    @contextlib.contextmanager
    def _reference_weights(self):
        """reference=adapter: the snapshot's values in the LoRA parameters inside the block. Used only BEFORE the
        trained forward of a step, so no autograd graph holds the parameters while they are overwritten."""
        backup = self._snapshot()
        with torch.no_grad():
            for n, p in self.named_trainable:
                p.copy_(self.reference_snapshot[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.named_trainable:
                    p.copy_(backup[n])

    @torch.no_grad()
    def reference_velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict, prompts: list[str]) -> torch.Tensor:
        """The reference's velocity for the doubled batch [winners; losers] (`prompts`: one per pair)."""
        mode = self.config.reference
        if mode == "model":
            ref = self.reference_adapter
            if self.reference_shares_text_encoding:
                ref_cond = cond
            else:
                ref_cond = ref.encode_prompt(prompts)
                ref_cond = ref.cat_cond([ref_cond, ref_cond])
            return ref.velocity(x_t.to(ref.dtype), t, {k: v.to(ref.dtype) for k, v in ref_cond.items()})
        ctx = self.adapter.lora_disabled() if mode == "disabled_adapter" else self._reference_weights()
        with ctx, eval_mode(self.adapter.denoiser):  # no dropout in the reference
            return self.adapter.velocity(x_t, t, cond)

    def on_step_end(self, step: int) -> None:
        every = self.config.reference_refresh_every
        if self.config.reference == "adapter" and every and step % every == 0:
            self.reference_snapshot = self._snapshot()

    def extra_state(self) -> dict[str, torch.Tensor]:
        if self.reference_snapshot is None:
            return {}
        return {f"reference.{n}": v for n, v in self.reference_snapshot.items()}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.config.reference != "adapter":
            return
        ref = {k.removeprefix("reference."): v for k, v in tensors.items() if k.startswith("reference.")}
        if set(ref) != {n for n, _ in self.named_trainable}:
            raise ValueError("the checkpoint holds no reference-adapter snapshot for this LoRA (was it saved with "
                             "another reference mode?)")
        self.reference_snapshot = {n: ref[n].to(p.device, p.dtype) for n, p in self.named_trainable}

    # ------------------------------------------------------------------------------------- the loss
    def save_model(self, directory: Path) -> None:
        self.adapter.save_lora(directory)

    def pair_latents(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents of A, latents of B) in the adapter's normalised latent space, float32."""
        return pair_latents(self.adapter, batch, self.device)

    def orient_pairs(self, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(swap, keep, label_w): swap where B is preferred (so w comes first), keep = pairs that enter the loss,
        label_w = probability that the (possibly swapped) first item wins, after the tie policy."""
        swap = label < 0.5
        label_w = torch.where(swap, 1 - label, label)
        tie = label_w == 0.5
        keep = torch.ones_like(tie)
        if self.tie_policy == "drop":
            keep = ~tie
        elif self.tie_policy == "keep_first":
            label_w = torch.where(tie, torch.ones_like(label_w), label_w)
        return swap, keep, label_w

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg, adapter = self.config, self.adapter
        lat_a, lat_b = self.pair_latents(batch)
        n = lat_a.shape[0]
        # Noise and timesteps are drawn for the whole batch first, so the generator advances the same way
        # whatever pairs are dropped.
        eps = torch.randn(lat_a.shape, generator=self.generator, device=self.device, dtype=torch.float32)
        t_kw = {"mean": cfg.logit_mean, "std": cfg.logit_std} if cfg.timestep_sampling == "logit_normal" else {}
        t = flow.sample_timesteps(n, cfg.timestep_sampling, generator=self.generator, device=self.device, **t_kw)

        label = batch["label"].to(self.device)
        swap, keep, label_w = self.orient_pairs(label)
        ties = int((label == 0.5).sum())  # as labelled, before the tie policy
        w4 = swap.view(-1, *([1] * (lat_a.ndim - 1)))
        x_w, x_l = torch.where(w4, lat_b, lat_a), torch.where(w4, lat_a, lat_b)
        prompts = [p for p, k in zip(batch["prompt"], keep.tolist()) if k]
        if "cond" in batch:
            cond = {k: v.to(self.device) for k, v in batch["cond"].items()}
        else:
            cond = adapter.encode_prompt(list(batch["prompt"]))
        if not bool(keep.all()):
            x_w, x_l, eps, t, label_w = x_w[keep], x_l[keep], eps[keep], t[keep], label_w[keep]
            cond = {k: v[keep] for k, v in cond.items()}
        if x_w.shape[0] == 0:  # only dropped ties: nothing to learn from this micro-batch
            nan = float("nan")
            zero = torch.zeros((), device=self.device)
            return zero, {"implicit_acc": nan, "z_mean": nan, "z_std": nan, "model_minus_ref_w": nan,
                          "model_minus_ref_l": nan, "mse_w": nan, "mse_l": nan, "beta_t_mean": nan,
                          "ties_in_batch": float(ties)}

        # Winners and losers in one batch, with the same noise and the same t.
        x0 = torch.cat([x_w, x_l])
        noise = torch.cat([eps, eps])
        t2 = torch.cat([t, t])
        cond = {k: v.to(adapter.dtype) for k, v in cond.items()}
        cond2 = adapter.cat_cond([cond, cond])
        x_t = flow.interpolate(x0, noise, t2)
        target = flow.velocity_target(x0, noise)

        ref_v = self.reference_velocity(x_t.to(adapter.dtype), t2, cond2, prompts)
        v = adapter.velocity(x_t.to(adapter.dtype), t2, cond2)
        model_err = per_sample_mse(v, target)
        ref_err = per_sample_mse(ref_v, target)
        mw, ml = model_err.chunk(2)
        rw, rl = ref_err.chunk(2)
        divergence = None if cfg.divergence == "reverse_kl" else cfg.divergence  # reverse KL is Flow-DPO itself
        loss, stats = flow_dpo_loss(mw, ml, rw, rl, cfg.beta, t=t, beta_schedule=cfg.beta_schedule, label=label_w,
                                    divergence=divergence, alpha=cfg.divergence_alpha)
        if cfg.sft_weight:
            # Winners' own flow-matching error (decided pairs only): counters the likelihood displacement of DPO,
            # where the winners' error rises along with the losers' while their difference grows.
            decided = label_w > 0.5
            sft = mw[decided].mean() if bool(decided.any()) else mw.sum() * 0.0
            loss = loss + cfg.sft_weight * sft
        beta_t = beta_at(cfg.beta, t, cfg.beta_schedule)
        metrics = {
            "implicit_acc": stats["implicit_acc"],
            "z_mean": stats["z_mean"],
            "z_std": stats["z_std"],
            "model_minus_ref_w": stats["model_minus_ref_w"],
            "model_minus_ref_l": stats["model_minus_ref_l"],
            "mse_w": mw.detach().mean(),
            "mse_l": ml.detach().mean(),
            "beta_t_mean": float(torch.as_tensor(beta_t, dtype=torch.float32).mean()),
            "ties_in_batch": float(ties),
        }
        return loss, metrics

    def nonfinite_hint(self) -> str:
        cfg = self.config
        if cfg.divergence in ("forward_kl", "alpha"):
            return (f"divergence={cfg.divergence}: f'(u) grows like exp(-(beta/2) l) when the model's error on a pair "
                    f"rises far above the reference's; lower beta (now {cfg.beta:g}) or use reverse_kl / js")
        return f"the denoiser's output overflowed (mixed_precision={cfg.mixed_precision})"

    # ------------------------------------------------------------------------------------- from a config
    @classmethod
    def from_config(cls, config: FlowDPOConfig) -> FlowDPOTrainer:
        """Load the model (`config.model`) and the data (`config.data`) and build the trainer."""
        from ..models import load_adapter

        if not config.data:
            raise ConfigError("config key 'data': give the preference pairs or a latent cache folder (data=PATH), "
                              "or online_prompts=world|FILE for online pairs")
        if not config.model:
            raise ConfigError("config key 'model': give the pipeline folder or hub id to train (model=PATH), "
                              "or model=world for the built-in world's image model")
        from ..world import resolve_model

        model_path, extra, _ = resolve_model(config.model)
        if config.max_sequence_length:
            extra["max_sequence_length"] = config.max_sequence_length
        from ..data.cache import holds_prompt_embeddings

        # On a cache with every prompt's embeddings the text encoders would only take memory (on the accelerator
        # too, where prepare_model moves the pipeline): built empty, checked against the cache from their files,
        # then released.
        on_cache = holds_prompt_embeddings(config.data)
        adapter = load_adapter(model_path, text_encoders="empty" if on_cache else "load", **extra)
        dataset = load_training_pairs(config.data, adapter, config)
        if on_cache:
            freed = adapter.release_text_encoders()
            logger.info("training on the latent cache %s: text encoders released (%.1f M parameters)",
                        config.data, freed / 1e6)
        return cls(adapter, config, dataset)


def load_training_pairs(data: str, adapter, config: FlowDPOConfig):
    """A latent cache folder (manifest.json) is used as is after checking it fits the model; anything else is
    read by `load_preference_pairs` with the config's tie policy."""
    from ..data import load_cache, load_preference_pairs

    if (Path(data) / "manifest.json").is_file():
        return load_cache(data, adapter=adapter, resolution=config.resolution, num_frames=config.num_frames)
    return load_preference_pairs(data, tie_policy=config.tie_policy)


def main(argv: list[str] | None = None) -> int:
    """`genalign train flow-dpo --config recipe.yaml [--resume latest] [key=value ...]`."""
    from .command import parse_training_args, recipe_arg, run_training, training_parser

    prog = "genalign train flow-dpo"
    parser = training_parser(prog, __doc__.split("\n\n")[0],
                             config_help="YAML recipe (e.g. genalign/recipes/flow_dpo_world.yaml)")
    parsed = parse_training_args(parser, FlowDPOConfig, argv)
    if parsed is None:
        return 0
    args, overrides = parsed

    def train() -> int:
        config = load_config(FlowDPOConfig, recipe_arg(args.config), overrides)
        if config.online_prompts:
            from .online_pairs import train_online

            result = train_online(config)
        else:
            result = FlowDPOTrainer.from_config(config).train()
        print(f"done: step {result.step}, LoRA at {result.final_model_dir}")
        return 0

    return run_training(prog, train)


if __name__ == "__main__":
    sys.exit(main())
