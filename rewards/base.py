"""The one interface every genalign reward model follows (CONVENTIONS.md, "Rewards").

    reward = load_reward_model("path/to/folder")           # any kind, dispatched on what the folder holds
    scores = reward(images_or_videos, prompts)              # Tensor[B], or dict[str, Tensor[B]] (multi-dimensional)
    probs = reward.probs(candidates, "a red circle")        # softmax over one prompt's candidates
    reward.save_pretrained("out/")                          # weights (safetensors) + genalign_reward.json

Media
-----
`media` is one of:

- a list of uint8 numpy arrays, images (H, W, 3) or videos (F, H, W, 3), RGB; sizes may differ;
- a uint8 numpy array whose first axis is the batch: (B, H, W, 3) images or (B, F, H, W, 3) videos (a single
  video must be wrapped in a list: a 4-D array is read as a batch of images);
- file paths (str / Path, or a list of them): images, video files, gifs or folders of frames (read with
  `genalign.data.media`; a file that cannot be read raises `DataError` naming it);
- PIL images (in a list);
- float tensors in [0, 1], channels first: (B, 3, H, W) images or (B, F, 3, H, W) videos (or a list of
  (3, H, W) / (F, 3, H, W) tensors). This is the differentiable path: with `differentiable=True` gradients
  flow from the scores back to these pixels.

`prompts` is a list with one prompt per item, or one string used for every item. Different numbers of media
and prompts raise ValueError naming both counts. Prompts longer than the text encoder takes are truncated with
a `RewardInputWarning`. Videos whose fps (the `fps` argument: one number or one per item) is far from the fps the
model was trained at give a `RewardInputWarning` with both numbers.

Scores
------
Models compute raw scores per dimension (`dimensions`, e.g. ("score",) for a CLIP reward, ("VQ", "MQ", "TA")
for VideoReward). Each dimension has normalisation metadata (mean, std) saved with the checkpoint; by default
(`normalize=True`) scores are reported as `(raw - mean) / std`. Multi-dimensional models also report an overall
dimension (VideoReward: "Overall" = VQ + MQ + TA, of the normalised scores when normalising). `probs` always
uses raw scores (PickScore's probabilities are defined on them).

With `differentiable=False` (default) scoring runs under `torch.no_grad()`; training goes through
`model.loss(batch)`, which always tracks gradients and returns `(loss, metrics)` for a trainer's
`compute_loss`.

Checkpoints
-----------
`save_pretrained(dir)` writes the weights (safetensors) and `genalign_reward.json` (kind, dimensions,
normalisation, the model's settings). `load_reward_model(dir)` reads that file and builds the right class; a
folder without it is recognised as a published layout (a transformers CLIP folder, an open_clip folder, a
VideoAlign checkpoint). `SomeReward.from_pretrained(dir)` on a folder holding another kind raises
`RewardLoadError` naming the folder and the kind it holds.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from genalign.data.errors import DataError
from genalign.files import shared_as_written

REWARD_CONFIG_NAME = "genalign_reward.json"
FORMAT_VERSION = 1

# kind -> (module, class); imported only when a model of that kind is loaded (keeps `import` light)
REWARD_KINDS: dict[str, tuple[str, str]] = {
    "clip": ("genalign.rewards.clip_reward", "CLIPReward"),
    "video_reward": ("genalign.rewards.video_reward", "VideoReward"),
    "ensemble": ("genalign.rewards.ensemble", "EnsembleReward"),
}


class RewardInputWarning(UserWarning):
    """Inputs a reward model can score, but not as well as it could: truncated prompts, fps far from training."""


class RewardLoadError(ValueError):
    """A folder that does not hold a reward model of the kind asked for."""


# ------------------------------------------------------------------------------------------- media
def _read_media_file(path: str | os.PathLike) -> np.ndarray:
    from genalign.data.media import load_media, media_kind_of_path

    p = Path(path)
    if not p.exists():
        raise DataError("file not found", file=p)
    kind = media_kind_of_path(p)
    try:
        return load_media(p, kind)
    except Exception as e:  # decoder errors differ by format; the message must name the file
        raise DataError(f"cannot read {kind} ({type(e).__name__}: {e})", file=p) from e


def _uint8_to_unit(array: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) in [0, 1]; (F, H, W, 3) -> (F, 3, H, W)."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise TypeError(f"numpy media must be uint8 (0..255), got {array.dtype}; pass float tensors in [0, 1] "
                        "channels-first for other types")
    if array.ndim not in (3, 4) or array.shape[-1] != 3:
        raise ValueError(f"expected an image (H, W, 3) or a video (F, H, W, 3), got shape {tuple(array.shape)}")
    x = torch.from_numpy(np.ascontiguousarray(array)).float() / 255.0
    return x.permute(2, 0, 1) if x.ndim == 3 else x.permute(0, 3, 1, 2)


def _check_unit_tensor(x: torch.Tensor) -> torch.Tensor:
    if not x.is_floating_point():
        raise TypeError(f"tensor media must be float in [0, 1], channels first; got dtype {x.dtype}")
    if x.ndim not in (3, 4) or x.shape[-3] != 3:
        raise ValueError(f"expected a float image (3, H, W) or video (F, 3, H, W), got shape {tuple(x.shape)}")
    return x


def media_to_unit_pixels(media) -> list[torch.Tensor]:
    """Any accepted media (module docstring) -> a list of float tensors in [0, 1]: (3, H, W) or (F, 3, H, W).

    Float tensors are kept as they are (same dtype, device and autograd graph)."""
    if isinstance(media, (str, os.PathLike)):
        media = [media]
    if isinstance(media, torch.Tensor):
        if media.dtype == torch.uint8:
            media = media.cpu().numpy()
        else:
            if media.ndim not in (4, 5):
                raise ValueError(f"a media tensor must be a batch (B, 3, H, W) or (B, F, 3, H, W), got shape "
                                 f"{tuple(media.shape)}")
            items = [_check_unit_tensor(x) for x in media.unbind(0)]
            _warn_if_not_unit_range(media)
            return items
    if isinstance(media, np.ndarray):
        if media.ndim not in (4, 5):
            raise ValueError(f"a media array must be a batch (B, H, W, 3) or (B, F, H, W, 3), got shape "
                             f"{media.shape}; wrap a single image or video in a list")
        return [_uint8_to_unit(x) for x in media]
    if not isinstance(media, Sequence):
        raise TypeError(f"cannot read media of type {type(media).__name__}")
    items = []
    for item in media:
        if isinstance(item, (str, os.PathLike)):
            items.append(_uint8_to_unit(_read_media_file(item)))
        elif isinstance(item, torch.Tensor):
            if item.dtype == torch.uint8:
                items.append(_uint8_to_unit(item.cpu().numpy()))
            else:
                _warn_if_not_unit_range(item)
                items.append(_check_unit_tensor(item))
        elif isinstance(item, np.ndarray):
            items.append(_uint8_to_unit(item))
        elif hasattr(item, "convert"):  # a PIL image
            items.append(_uint8_to_unit(np.asarray(item.convert("RGB"))))
        else:
            raise TypeError(f"cannot read a media item of type {type(item).__name__}")
    return items


def _warn_if_not_unit_range(x: torch.Tensor) -> None:
    with torch.no_grad():
        lo, hi = float(x.min()), float(x.max())
    if lo < -0.01 or hi > 1.01:
        warnings.warn(
            f"float pixels should be in [0, 1], got values in [{lo:.3g}, {hi:.3g}] (model pixels in [-1, 1]? "
            "pass (x + 1) / 2)", RewardInputWarning, stacklevel=4)


def prompt_list(prompts, count: int) -> list[str]:
    """One prompt per media item; a single string is used for every item."""
    if isinstance(prompts, str):
        return [prompts] * count
    prompts = list(prompts)
    if len(prompts) != count:
        raise ValueError(f"got {count} media but {len(prompts)} prompts: give one prompt per image or video "
                         "(or one string for all of them)")
    for p in prompts:
        if not isinstance(p, str):
            raise TypeError(f"prompts must be strings, got {type(p).__name__}")
    return prompts


def _fps_list(fps, count: int) -> list[float | None]:
    if fps is None or isinstance(fps, (int, float)):
        return [None if fps is None else float(fps)] * count
    fps = [None if f is None else float(f) for f in fps]
    if len(fps) != count:
        raise ValueError(f"got {count} media but {len(fps)} fps values")
    return fps


# ------------------------------------------------------------------------------------------- the interface
class RewardModel(nn.Module):
    """Base class of genalign's reward models (see the module docstring for the contract).

    Subclasses set `kind` and `dimensions`, and implement `_score_pixels` (raw scores of one batch),
    `_config` / `_save_weights` / `_from_saved` (checkpoints) and `loss` (training).
    """

    kind: ClassVar[str] = "reward"
    overall_dimension: ClassVar[str | None] = None  # multi-dimensional models: the sum of their dimensions
    fps_tolerance: ClassVar[float] = 1.5  # warn when the video fps differs from training fps by more than x1.5

    def __init__(
        self,
        dimensions: Sequence[str] = ("score",),
        *,
        differentiable: bool = False,
        normalize: bool = True,
        batch_size: int = 16,
        normalization: Mapping[str, Mapping[str, float]] | None = None,
        training_fps: float | None = None,
    ):
        super().__init__()
        self.dimensions = tuple(dimensions)
        self.differentiable = differentiable
        self.normalize = normalize
        self.batch_size = batch_size
        self.training_fps = training_fps
        self.normalization = {d: {"mean": 0.0, "std": 1.0} for d in self.dimensions}
        if normalization:
            self.set_normalization(normalization)

    # ----------------------------------------------------------------------------------- to implement
    def _score_pixels(self, pixels: list[torch.Tensor], prompts: list[str],
                      fps: list[float | None]) -> dict[str, torch.Tensor]:
        """Raw scores {dimension: (b,)} of one batch of [0, 1] pixels (3, H, W) / (F, 3, H, W)."""
        raise NotImplementedError

    def _config(self) -> dict[str, Any]:
        """JSON-serialisable settings saved in genalign_reward.json (under "config")."""
        return {}

    def _save_weights(self, directory: Path) -> None:
        raise NotImplementedError

    @classmethod
    def _from_saved(cls, directory: Path, config: dict[str, Any], **kwargs) -> RewardModel:
        raise NotImplementedError

    @classmethod
    def _from_published(cls, directory: Path, **kwargs) -> RewardModel:
        """Load a published layout (a folder without genalign_reward.json)."""
        raise RewardLoadError(f"{str(directory)!r} holds no {cls.kind!r} reward model in a layout genalign reads")

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, Any]]:
        """Training loss of one batch of preference pairs: (scalar loss, metrics)."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------- properties
    @property
    def output_dimensions(self) -> tuple[str, ...]:
        """Every key of the score dict: the dimensions plus the overall one, if any."""
        return self.dimensions + ((self.overall_dimension,) if self.overall_dimension else ())

    @property
    def is_multi_dimensional(self) -> bool:
        return len(self.dimensions) > 1

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        p = next((p for p in self.parameters() if p.is_floating_point()), None)
        return p.dtype if p is not None else torch.float32

    # ----------------------------------------------------------------------------------- normalisation
    def set_normalization(self, stats: Mapping[str, Mapping[str, float]]) -> None:
        """Set {dimension: {"mean": m, "std": s}} (dimensions not named keep theirs)."""
        for dim, s in stats.items():
            if dim not in self.dimensions:
                raise KeyError(f"unknown dimension {dim!r}; this model has {list(self.dimensions)}")
            std = float(s.get("std", 1.0))
            if not std > 0:
                raise ValueError(f"normalisation std of {dim!r} must be > 0, got {std}")
            self.normalization[dim] = {"mean": float(s.get("mean", 0.0)), "std": std}

    def fit_normalization(self, media, prompts, *, fps=None, batch_size: int | None = None) -> dict:
        """Set each dimension's mean / std to those of the raw scores of `media` (e.g. the training pairs'
        media), so that normalised scores are about N(0, 1) there. Returns the new statistics."""
        raw = self._raw_scores(media, prompts, fps=fps, batch_size=batch_size, track_grad=False)
        stats = {}
        for d in self.dimensions:
            x = raw[d].double()
            std = float(x.std(unbiased=False)) if x.numel() > 1 else 1.0
            stats[d] = {"mean": float(x.mean()), "std": std if std > 1e-8 else 1.0}
        self.set_normalization(stats)
        return stats

    def _apply_normalization(self, raw: dict[str, torch.Tensor], normalize: bool) -> dict[str, torch.Tensor]:
        out = {}
        for d in self.dimensions:
            s = self.normalization[d]
            out[d] = (raw[d] - s["mean"]) / s["std"] if normalize else raw[d]
        if self.overall_dimension:
            out[self.overall_dimension] = sum(out[d] for d in self.dimensions)
        return out

    # ----------------------------------------------------------------------------------- scoring
    def _check_fps(self, fps: list[float | None]) -> None:
        if self.training_fps is None:
            return
        far = sorted({f for f in fps if f is not None and f > 0
                      and abs(math.log(f / self.training_fps)) > math.log(self.fps_tolerance)})
        if far:
            shown = ", ".join(f"{f:g}" for f in far)
            warnings.warn(
                f"video fps {shown} far from the fps this reward model was trained at ({self.training_fps:g}): "
                "motion per frame differs, so scores (motion quality above all) may be off; resample the videos "
                f"to about {self.training_fps:g} fps", RewardInputWarning, stacklevel=4)

    def _raw_scores(self, media, prompts, *, fps=None, batch_size: int | None = None,
                    track_grad: bool) -> dict[str, torch.Tensor]:
        pixels = media_to_unit_pixels(media)
        if not pixels:
            raise ValueError("no media to score")
        prompts = prompt_list(prompts, len(pixels))
        fps = _fps_list(fps, len(pixels))
        self._check_fps(fps)
        batch_size = batch_size or self.batch_size
        chunks: dict[str, list[torch.Tensor]] = {d: [] for d in self.dimensions}
        grad_context = contextlib.nullcontext() if track_grad else torch.no_grad()
        with grad_context:
            for start in range(0, len(pixels), batch_size):
                stop = start + batch_size
                scores = self._score_pixels(pixels[start:stop], prompts[start:stop], fps[start:stop])
                for d in self.dimensions:
                    chunks[d].append(scores[d].float())
        return {d: torch.cat(chunks[d]) for d in self.dimensions}

    def score_dict(self, media, prompts, *, fps=None, normalize: bool | None = None,
                   batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """Scores of every output dimension as a dict (also for single-dimensional models)."""
        raw = self._raw_scores(media, prompts, fps=fps, batch_size=batch_size, track_grad=self.differentiable)
        return self._apply_normalization(raw, self.normalize if normalize is None else normalize)

    def forward(self, media, prompts, *, fps=None, normalize: bool | None = None,
                batch_size: int | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
        """Tensor[B] for single-dimensional models, dict[str, Tensor[B]] for multi-dimensional ones."""
        scores = self.score_dict(media, prompts, fps=fps, normalize=normalize, batch_size=batch_size)
        return scores if self.is_multi_dimensional else scores[self.dimensions[0]]

    def probs(self, media, prompt: str, *, dimension: str | None = None, fps=None) -> torch.Tensor:
        """Softmax of the raw scores of one prompt's candidates (PickScore's preference probabilities).

        Multi-dimensional models use `dimension` (default: the overall one)."""
        if not isinstance(prompt, str):
            raise TypeError("probs compares the candidates of ONE prompt: pass a single string")
        raw = self._raw_scores(media, prompt, fps=fps, track_grad=self.differentiable)
        scores = self._apply_normalization(raw, normalize=False)
        dimension = dimension or self.overall_dimension or self.dimensions[0]
        if dimension not in scores:
            raise KeyError(f"unknown dimension {dimension!r}; this model has {list(scores)}")
        return torch.softmax(scores[dimension], dim=0)

    # ----------------------------------------------------------------------------------- checkpoints
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the weights and genalign_reward.json (written last: a folder without it is incomplete)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with shared_as_written(directory):  # safetensors writes 0600 files (genalign.files)
            self._save_weights(directory)
        meta = {
            "kind": self.kind,
            "format_version": FORMAT_VERSION,
            "dimensions": list(self.dimensions),
            "overall_dimension": self.overall_dimension,
            "normalization": self.normalization,
            "training_fps": self.training_fps,
            "config": self._config(),
        }
        tmp = directory / (REWARD_CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, directory / REWARD_CONFIG_NAME)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, differentiable: bool = False,
                        normalize: bool = True, batch_size: int | None = None,
                        device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        **kwargs) -> RewardModel:
        """Load a folder written by `save_pretrained` or a published layout this class reads."""
        directory = Path(directory)
        kind = detect_reward_kind(directory)
        model_class = reward_class(kind) if cls is RewardModel else cls  # the base class dispatches on the kind
        if kind != model_class.kind:
            raise RewardLoadError(
                f"{str(directory)!r} holds a {kind!r} reward model, not a {model_class.kind!r} one; load it with "
                f"genalign.rewards.load_reward_model({str(directory)!r})")
        meta = read_reward_config(directory)
        if meta is not None:
            model = model_class._from_saved(directory, meta.get("config", {}), **kwargs)
            model.set_normalization(meta.get("normalization", {}))
            if meta.get("training_fps") is not None:
                model.training_fps = float(meta["training_fps"])
        else:
            model = model_class._from_published(directory, **kwargs)
        model.differentiable, model.normalize = differentiable, normalize
        if batch_size:
            model.batch_size = batch_size
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        return model.eval()


# ------------------------------------------------------------------------------------------- loading
def read_reward_config(directory: str | os.PathLike) -> dict | None:
    path = Path(directory) / REWARD_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RewardLoadError(f"{str(path)!r} is not valid JSON ({e})") from e


def detect_reward_kind(directory: str | os.PathLike) -> str:
    """The kind of reward model a folder holds (genalign_reward.json, else recognised published layouts)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"reward model folder {str(directory)!r} does not exist")
    meta = read_reward_config(directory)
    if meta is not None:
        kind = meta.get("kind")
        if kind not in REWARD_KINDS:
            raise RewardLoadError(f"{str(directory)!r}: unknown reward kind {kind!r} in {REWARD_CONFIG_NAME} "
                                  f"(known: {', '.join(REWARD_KINDS)})")
        return kind
    config_json = directory / "config.json"
    if config_json.is_file():
        try:
            model_type = json.loads(config_json.read_text()).get("model_type")
        except json.JSONDecodeError:
            model_type = None
        if model_type == "clip":
            return "clip"
    if (directory / "open_clip_config.json").is_file():
        return "clip"
    if (directory / "model_config.json").is_file() or (directory / "adapter_config.json").is_file() or any(
            (p / "adapter_config.json").is_file() for p in directory.glob("checkpoint-*")):
        return "video_reward"
    raise RewardLoadError(
        f"{str(directory)!r} holds no reward model genalign recognises: expected {REWARD_CONFIG_NAME} (written by "
        "save_pretrained), a transformers CLIP folder (config.json with model_type 'clip', e.g. PickScore), an "
        "open_clip folder (open_clip_config.json) or a VideoAlign checkpoint (model_config.json / "
        "adapter_config.json). For an open_clip architecture + checkpoint file (e.g. HPSv2) use "
        "CLIPReward.from_open_clip(...)")


def reward_class(kind: str) -> type[RewardModel]:
    if kind not in REWARD_KINDS:
        raise KeyError(f"unknown reward kind {kind!r} (known: {', '.join(REWARD_KINDS)})")
    module, name = REWARD_KINDS[kind]
    return getattr(importlib.import_module(module), name)


def load_reward_model(directory: str | os.PathLike, **kwargs) -> RewardModel:
    """Load any genalign reward model folder (or a recognised published layout); kwargs go to from_pretrained
    (differentiable, normalize, batch_size, device, dtype, and the class's own options)."""
    return reward_class(detect_reward_kind(directory)).from_pretrained(directory, **kwargs)


# ------------------------------------------------------------------------------------------- training batches
def collate_reward_pairs(pairs: Sequence) -> dict[str, Any]:
    """DataLoader collate for `PreferencePair`s that keeps what reward training needs: media stay lists, labels
    become tensors (`labels` per dimension, NaN where a pair has none) and the videos' fps come from the
    pairs' meta (`fps_A` / `fps_B` of VideoAlign CSVs; None when unknown)."""
    dims = list(dict.fromkeys(d for p in pairs for d in (p.labels or {})))

    def fps_of(pair, key):
        meta = pair.meta or {}
        value = meta.get(key, meta.get(key.lower()))  # genalign.data's CSV reader lower-cases the meta keys
        try:
            return None if value in (None, "") else float(value)
        except (TypeError, ValueError):
            return None

    return {
        "prompt": [p.prompt for p in pairs],
        "media_a": [p.media_a for p in pairs],
        "media_b": [p.media_b for p in pairs],
        "label": torch.tensor([float(p.label) for p in pairs], dtype=torch.float32),
        "labels": {d: torch.tensor([float((p.labels or {}).get(d, float("nan"))) for p in pairs],
                                   dtype=torch.float32) for d in dims},
        "fps_a": [fps_of(p, "fps_A") for p in pairs],
        "fps_b": [fps_of(p, "fps_B") for p in pairs],
    }


def as_reward_batch(batch) -> dict[str, Any]:
    """A list of PreferencePair, a `collate_reward_pairs` dict or a `genalign.data.collate_pairs` dict (its
    per-pair `labels` dicts are turned into per-dimension tensors) -> a `collate_reward_pairs`-style dict."""
    if isinstance(batch, Mapping):
        out = dict(batch)
        labels = out.get("labels")
        if isinstance(labels, list):  # collate_pairs: one dict (or None) per pair
            dims = list(dict.fromkeys(d for lab in labels for d in (lab or {})))
            out["labels"] = {d: torch.tensor([float((lab or {}).get(d, float("nan"))) for lab in labels],
                                             dtype=torch.float32) for d in dims}
        out.setdefault("labels", {})
        n = len(out["prompt"])
        out.setdefault("fps_a", [None] * n)
        out.setdefault("fps_b", [None] * n)
        if not isinstance(out["label"], torch.Tensor):
            out["label"] = torch.tensor([float(x) for x in out["label"]], dtype=torch.float32)
        return out
    return collate_reward_pairs(list(batch))
