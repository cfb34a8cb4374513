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


def sampling_defaults(model_path: str | Path, kind: str | None = None) -> dict:
    """Defaults stored with a model folder (genalign_sampling.json), else the world's for its kind."""
    f = Path(model_path) / "genalign_sampling.json"
    if f.is_file():
        return json.loads(f.read_text())
    return dict(DEFAULT_SAMPLING.get(kind or "image", DEFAULT_SAMPLING["image"]))


WORLD_MODEL_NAMES = {"world": "image", "world-image": "image", "world-video": "video"}


def resolve_model(model: str | None, kind: str | None = None) -> tuple[str, dict, dict]:
    """A `--model` value -> (path or hub id, adapter keyword arguments, sampling defaults).

    None / 'world' / 'world-image' / 'world-video' name the shipped world models (None follows `kind`);
    anything else is a pipeline folder or hub id. A folder's genalign_sampling.json (written with the world's
    models) supplies its sampling defaults and text length."""
    if model is None or model in WORLD_MODEL_NAMES:
        path = str(world_model_path(WORLD_MODEL_NAMES.get(model, kind or "image")))
    else:
        path = str(model)
    defaults = sampling_defaults(path, kind) if Path(path).is_dir() else {}
    adapter_kwargs = {"max_sequence_length": defaults["max_sequence_length"]} if "max_sequence_length" in defaults else {}
    return path, adapter_kwargs, defaults
