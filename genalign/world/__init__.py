"""The built-in world: a prompt language, a renderer, an oracle judge, an imperfect corpus, simulated
annotators and small shipped base generators, so every feature of genalign can be measured on a CPU.

See WORLD.md in the design notes and the README's "The built-in world" section.
"""

from __future__ import annotations

import json
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
MODEL_DIRS = {"image": "image-base", "video": "video-base"}
# Flow-DPO LoRAs trained on the world's preference pairs (diffusers LoRA format), what `genalign demo` serves.
ALIGNED_LORA_DIRS = {"image": "image-aligned-lora"}
# Noise-aware latent reward models for Flow-NRG (and the clean-latent ablation), `genalign world build --only
# latent-reward`; LatentRewardModel.save_pretrained folders.
LATENT_REWARD_DIRS = {("image", False): "image-latent-reward", ("image", True): "image-latent-reward-clean"}
# Learned reward models on the base models' labelled pairs (genalign.rewards save_pretrained folders, `genalign world
# build --only reward`): PickScore-style CLIP for images, VideoReward-style VQ / MQ / TA for videos.
REWARD_MODEL_DIRS = {"image": "image-reward", "video": "video-reward"}

# Sampling defaults of the shipped models (also written to each model folder as genalign_sampling.json).
DEFAULT_SAMPLING = {
    "image": {"num_steps": 20, "guidance_scale": 4.0, "height": 32, "width": 32},
    "video": {"num_steps": 20, "guidance_scale": 4.0, "height": 32, "width": 32, "num_frames": 8},
}


class WorldModelMissing(FileNotFoundError):
    pass


def world_model_path(kind: str = "image") -> Path:
    if kind not in MODEL_DIRS:
        raise ValueError(f"unknown world model {kind!r} (image or video)")
    path = ASSETS / MODEL_DIRS[kind]
    if not (path / "model_index.json").is_file():
        raise WorldModelMissing(
            f"the world's {kind} model is not at {path}; rebuild it with `genalign world build --only {kind}`"
        )
    return path


def aligned_lora_path(kind: str = "image") -> Path:
    """The shipped Flow-DPO LoRA for the world's `kind` model (a folder with pytorch_lora_weights.safetensors)."""
    if kind not in ALIGNED_LORA_DIRS:
        raise WorldModelMissing(f"no aligned LoRA is shipped for the world's {kind} model")
    path = ASSETS / ALIGNED_LORA_DIRS[kind]
    if not (path / "pytorch_lora_weights.safetensors").is_file():
        raise WorldModelMissing(f"the world's aligned {kind} LoRA is not at {path}; see {path.parent}/BUILD.json")
    return path


def latent_reward_path(kind: str = "image", clean: bool = False) -> Path:
    """The shipped latent reward model (VQ, TA) for the world's `kind` model: noise-aware (for Flow-NRG), or with
    clean=True the clean-latent ablation (trained at t = 0 only; paper Table 7). Load it with
    `genalign.guidance.LatentRewardModel.from_pretrained(path)` or pass it as `--nrg-reward`."""
    key = (kind, bool(clean))
    if key not in LATENT_REWARD_DIRS:
        what = "clean-latent" if clean else "noise-aware"
        raise WorldModelMissing(f"no {what} latent reward model is shipped for the world's {kind} model")
    path = ASSETS / LATENT_REWARD_DIRS[key]
    if not (path / "genalign_latent_reward.json").is_file():
        raise WorldModelMissing(f"the world's latent reward model is not at {path}; rebuild it with "
                                "`genalign world build --only latent-reward` (see BUILD.json)")
    return path


def reward_model_path(kind: str = "image") -> Path:
    """The shipped learned reward model for the world's `kind` media: "image" a PickScore-style CLIP (a world CLIP
    pretrained on captioned renders, then fine-tuned on the image model's labelled pairs), "video" a
    VideoReward-style VQ / MQ / TA model. Load it with `genalign.rewards.load_reward_model(path)` or pass it as
    `--model` to `genalign score` / `genalign eval-reward`; BUILD.json holds its held-out accuracies."""
    from ..rewards.base import REWARD_CONFIG_NAME

    if kind not in REWARD_MODEL_DIRS:
        raise ValueError(f"unknown world reward model {kind!r} (image or video)")
    path = ASSETS / REWARD_MODEL_DIRS[kind]
    if not (path / REWARD_CONFIG_NAME).is_file():
        raise WorldModelMissing(f"the world's {kind} reward model is not at {path}; rebuild it with "
                                f"`genalign world build --only reward reward_kinds={kind}` (see BUILD.json)")
    return path


def sampling_defaults(model_path: str | Path, kind: str | None = None) -> dict:
    """Defaults stored with a model folder (genalign_sampling.json), else the world's for its kind."""
    f = Path(model_path) / "genalign_sampling.json"
    if f.is_file():
        return json.loads(f.read_text())
    return dict(DEFAULT_SAMPLING.get(kind or "image", DEFAULT_SAMPLING["image"]))


# "world" (like no --model) follows --kind; the other two name one model whatever the kind
WORLD_MODEL_NAMES = {"world": None, "world-image": "image", "world-video": "video"}


def resolve_model(model: str | None, kind: str | None = None) -> tuple[str, dict, dict]:
    """A `--model` value -> (path or hub id, adapter keyword arguments, sampling defaults).

    None / 'world' / 'world-image' / 'world-video' name the shipped world models (None follows `kind`);
    anything else is a pipeline folder or hub id. A folder's genalign_sampling.json (written with the world's
    models) supplies its sampling defaults and text length."""
    if model is None or model in WORLD_MODEL_NAMES:
        path = str(world_model_path(WORLD_MODEL_NAMES.get(model) or kind or "image"))
    else:
        path = str(model)
    defaults = sampling_defaults(path, kind) if Path(path).is_dir() else {}
    adapter_kwargs = {"max_sequence_length": defaults["max_sequence_length"]} if "max_sequence_length" in defaults else {}
    return path, adapter_kwargs, defaults
