"""VideoReward-style multi-dimensional video reward (Liu et al., "Improving Video Generation with Human Feedback",
arXiv 2501.13918; the VideoAlign project).

A vision-language backbone (transformers' Qwen2-VL, `Qwen2VLModel`) reads the video and a text built from a
template holding three special tokens:

    <|im_start|>user\\n{video}\\nVisual quality: <|VQ_reward|>\\nMotion quality: <|MQ_reward|>\\n
    Prompt: {prompt}\\nText alignment: <|TA_reward|><|im_end|>\\n           (the default template)

`{video}` becomes <|vision_start|>, one <|video_pad|> per merged video patch, <|vision_end|>. A bias-free linear
head reads the last hidden state at each reward token: VQ (visual quality), MQ (motion quality), TA (text
alignment). VQ and MQ come BEFORE the prompt text, so under causal attention they see only the video
("context-agnostic"); TA comes after it and sees video and prompt. Overall = VQ + MQ + TA. A template is
checked for that order when the model is built.

The head is shared by the three tokens (one output, `head="shared"`, as the published model's `output_dim=1`) or
has one output per dimension (`head="per_dimension"`: dimension d reads output d at its own token).

Training (`loss`): Bradley-Terry with ties (theta = 5 by default) or plain BT per dimension
(`genalign.losses.reward`), invalid / missing labels masked out of the mean; LoRA (peft) on the language model's
attention projections, the vision tower trainable (`train_vision=True`) or frozen, the head always trained.

Frames and fps: the model samples `num_frames` frames uniformly from each video (frames repeat when a video has
fewer; a warning says so) and resizes them to `frame_size` (or by Qwen2-VL's rule: sides rounded to multiples of
patch_size * merge_size, the area kept within [min_pixels, max_pixels]). The fps the model was trained at
(`fps`) and `num_frames` are saved with the checkpoint; scoring videos whose fps (the `fps` argument) is far
from it gives a warning with both numbers. Preprocessing is done in torch and is differentiable (bicubic
antialiased resize, CLIP mean / std, Qwen2-VL's patch layout, checked against `Qwen2VLVideoProcessor`).

Checkpoints (`save_pretrained`): `genalign_reward.json`, `tokenizer/`, `backbone/` (the base weights, less the
vision tower when it is trained: that is saved once, in non_lora.safetensors; the backbone is left out when the
model names a local base folder, `base_model_path`, and `save_base=False`), `adapter/` (peft LoRA
adapter: adapter_config.json + adapter_model.safetensors) and `non_lora.safetensors` (head, reward-token
embeddings, the vision tower when trained).

Published layout (`VideoReward.from_pretrained(folder, base_model=...)` on a folder without
genalign_reward.json): a VideoAlign checkpoint folder with `model_config.json` (fps, num_frames,
max_frame_pixels, per-dimension mean / std) and a `checkpoint-<step>/` (or the folder itself) holding a peft
adapter (adapter_config.json + adapter_model.safetensors / .bin) and a non-LoRA state file
(non_lora_state_dict.pth / .safetensors: the reward head `rm_head`, embeddings, ...), or one full state dict.
Key names of transformers 4 (`model.layers.*`, `visual.*`) and 5 (`model.language_model.*`, `model.visual.*`)
are both read. The base Qwen2-VL folder must be local (`base_model=`). The published model was trained with
its own prompt template (not shipped here): pass it as `prompt_template=` to reproduce its scores. This loader
is tested on tiny checkpoints written in that layout, not on the published weights (no hub access here).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import RewardInputWarning, RewardLoadError, RewardModel, as_reward_batch
from .clip_reward import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, check_tokenizer_size

DIMENSIONS = ("VQ", "MQ", "TA")
REWARD_TOKENS = {"VQ": "<|VQ_reward|>", "MQ": "<|MQ_reward|>", "TA": "<|TA_reward|>"}
DEFAULT_TEMPLATE = (
    "<|im_start|>user\n{video}\nVisual quality: <|VQ_reward|>\nMotion quality: <|MQ_reward|>\n"
    "Prompt: {prompt}\nText alignment: <|TA_reward|><|im_end|>\n"
)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class VideoRewardConfig:
    """Settings of a VideoReward model, saved in genalign_reward.json."""

    prompt_template: str = DEFAULT_TEMPLATE
    fps: float = 8.0  # fps of the training videos
    num_frames: int = 8  # frames sampled from each video
    frame_size: tuple[int, int] | None = None  # (H, W); None: Qwen2-VL's rounding within min/max_pixels
    min_pixels: int = 56 * 56
    max_pixels: int = 448 * 448
    max_prompt_tokens: int = 128
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    head: str = "shared"  # "shared" (one output read at every token) | "per_dimension"
    loss: str = "btt"  # "btt" (Bradley-Terry with ties) | "bt" (plain BT; ties left out)
    tie_theta: float = 5.0
    lora_rank: int = 16  # 0: no LoRA, the language model is trained in full
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] | str = LORA_TARGETS  # names in the language model, or one regex
    train_vision: bool = False
    base_model_path: str | None = None  # a local base folder the checkpoint can refer to instead of saving it

    def __post_init__(self):
        if self.head not in ("shared", "per_dimension"):
            raise ValueError(f"head must be 'shared' or 'per_dimension', got {self.head!r}")
        if self.loss not in ("btt", "bt"):
            raise ValueError(f"loss must be 'btt' or 'bt', got {self.loss!r}")
        if self.frame_size is not None:
            self.frame_size = tuple(int(s) for s in self.frame_size)
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)
        if not isinstance(self.lora_target_modules, str):
            self.lora_target_modules = tuple(self.lora_target_modules)
        check_template(self.prompt_template)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VideoRewardConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown VideoReward settings {unknown}; known: {sorted(known)}")
        return cls(**data)


def check_template(template: str) -> None:
    """The template must hold {video}, {prompt} and the three reward tokens once each, in the order
    {video} < VQ, MQ < {prompt} < TA (so VQ / MQ see only the video under causal attention)."""
    positions = {}
    for name, piece in [("{video}", "{video}"), ("{prompt}", "{prompt}")] + [(t, t) for t in REWARD_TOKENS.values()]:
        count = template.count(piece)
        if count != 1:
            raise ValueError(f"the prompt template must contain {name} exactly once (found {count})")
        positions[name] = template.index(piece)
    video, prompt = positions["{video}"], positions["{prompt}"]
    vq, mq, ta = (positions[REWARD_TOKENS[d]] for d in DIMENSIONS)
    if not (video < vq < prompt and video < mq < prompt < ta):
        raise ValueError("the prompt template must place {video} first, <|VQ_reward|> and <|MQ_reward|> before "
                         "{prompt}, and <|TA_reward|> after it (VQ and MQ must not see the prompt)")


# ------------------------------------------------------------------------------------------- video pixels
def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's frame size rule: both sides multiples of `factor`, aspect ratio about kept, area within
    [min_pixels, max_pixels]."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / shrink / factor) * factor)
        w = max(factor, math.floor(width / shrink / factor) * factor)
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * grow / factor) * factor
        w = math.ceil(width * grow / factor) * factor
    return h, w


def patchify_video(frames: torch.Tensor, patch_size: int, temporal_patch_size: int,
                   merge_size: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Normalised frames (T, C, H, W) -> flattened patches (grid_t * grid_h * grid_w, C * tp * p * p) in the
    order Qwen2-VL's vision tower reads them (patches of one merge window are consecutive), and the grid.

    T must be a multiple of temporal_patch_size and H, W multiples of patch_size * merge_size."""
    t, c, h, w = frames.shape
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    x = frames.reshape(gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size,
                       gw // merge_size, merge_size, patch_size)
    # -> (gt, window row, window col, row in window, col in window, C, tp, pixel row, pixel col)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size), (gt, gh, gw)


def sample_frame_indices(num_available: int, num_frames: int) -> torch.Tensor:
    """`num_frames` indices spread uniformly over the video, first and last frame included."""
    return torch.linspace(0, num_available - 1, num_frames).round().long()


# ------------------------------------------------------------------------------------------- the model
class VideoReward(RewardModel):
    """VideoReward-style reward: VQ, MQ, TA scores (+ Overall) from a Qwen2-VL backbone (module docstring)."""

    kind = "video_reward"
    overall_dimension = "Overall"

    def __init__(self, backbone: nn.Module, tokenizer, config: VideoRewardConfig | None = None, **kwargs):
        """`backbone`: a `Qwen2VLModel` (a `Qwen2VLForConditionalGeneration` folder loads as one with
        `Qwen2VLModel.from_pretrained`); `tokenizer`: its tokenizer. The reward tokens are added to the tokenizer
        and the embedding table (both are changed in place) and LoRA is attached per `config`."""
        config = config or VideoRewardConfig()
        if not (hasattr(backbone, "visual") and hasattr(backbone, "language_model")):
            raise TypeError("VideoReward needs a transformers Qwen2VLModel holding both .visual and .language_model "
                            f"(transformers >= 5), got {type(backbone).__name__}")
        super().__init__(DIMENSIONS, training_fps=config.fps, **kwargs)
        self.config = config
        self.tokenizer = tokenizer
        model_config = backbone.config

        # the reward tokens: added to the tokenizer (and the embedding table) when missing
        missing = [t for t in REWARD_TOKENS.values() if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        embedding_rows = backbone.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > embedding_rows:
            backbone.resize_token_embeddings(len(tokenizer))
        check_tokenizer_size(tokenizer, backbone.get_input_embeddings().weight.shape[0], "VideoReward")
        self.reward_token_ids = {d: tokenizer.convert_tokens_to_ids(t) for d, t in REWARD_TOKENS.items()}
        self.video_token_id = model_config.video_token_id
        self.vision_start_id = model_config.vision_start_token_id
        self.vision_end_id = model_config.vision_end_token_id
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (tokenizer.eos_token_id or 0)
        vision = model_config.vision_config
        self.patch_size, self.merge_size = vision.patch_size, vision.spatial_merge_size
        self.temporal_patch_size = vision.temporal_patch_size
        if config.num_frames % self.temporal_patch_size:
            raise ValueError(f"num_frames ({config.num_frames}) must be a multiple of the vision tower's "
                             f"temporal_patch_size ({self.temporal_patch_size})")
        if config.frame_size is not None and any(s % (self.patch_size * self.merge_size) for s in config.frame_size):
            raise ValueError(f"frame_size {config.frame_size} must be multiples of patch_size * merge_size = "
                             f"{self.patch_size * self.merge_size}")
        self._template_parts = self._split_template(config.prompt_template)
        self.register_buffer("image_mean", torch.tensor(config.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(config.image_std).view(1, 3, 1, 1), persistent=False)

        hidden_size = model_config.text_config.hidden_size
        self.head = nn.Linear(hidden_size, 1 if config.head == "shared" else len(DIMENSIONS), bias=False)
        self.backbone = self._attach_lora(backbone)
        self._set_trainable()

    # ----------------------------------------------------------------------------------- parts
    def _attach_lora(self, backbone: nn.Module) -> nn.Module:
        if self.config.lora_rank <= 0:
            return backbone
        from peft import LoraConfig, get_peft_model

        targets = self.config.lora_target_modules
        if not isinstance(targets, str):  # module names -> a regex restricted to the language model
            targets = r".*language_model.*\.({})".format("|".join(re.escape(m) for m in targets))
        lora = LoraConfig(r=self.config.lora_rank, lora_alpha=self.config.lora_alpha,
                          lora_dropout=self.config.lora_dropout, target_modules=targets)
        return get_peft_model(backbone, lora)

    @property
    def base_model(self) -> nn.Module:
        """The Qwen2-VL model (inside the peft wrapper when LoRA is on)."""
        return self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone

    @property
    def uses_lora(self) -> bool:
        return hasattr(self.backbone, "peft_config")

    def _set_trainable(self) -> None:
        for name, p in self.base_model.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
            elif name.startswith("visual."):
                p.requires_grad_(self.config.train_vision)
            else:  # the language model: frozen under LoRA, trained in full without it
                p.requires_grad_(not self.uses_lora)
        self.head.requires_grad_(True)

    def _split_template(self, template: str) -> tuple[list[int], list[int], list[int]]:
        """Token ids of the text before {video}, between {video} and {prompt}, and after {prompt}."""
        before_video, rest = template.split("{video}")
        between, after_prompt = rest.split("{prompt}")
        return tuple(self.tokenizer(part, add_special_tokens=False)["input_ids"]
                     for part in (before_video, between, after_prompt))

    # ----------------------------------------------------------------------------------- inputs
    def frame_size_for(self, height: int, width: int) -> tuple[int, int]:
        if self.config.frame_size is not None:
            return self.config.frame_size
        return smart_resize(height, width, self.patch_size * self.merge_size, self.config.min_pixels,
                            self.config.max_pixels)

    def video_patches(self, video: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """[0, 1] video (F, 3, H, W) or image (3, H, W) -> (patches, grid): frames sampled, resized, normalised
        and patchified. Differentiable."""
        if video.ndim == 3:  # an image: a still video
            video = video[None]
        if video.shape[0] < self.config.num_frames and video.shape[0] > 1:
            warnings.warn(f"a video has {video.shape[0]} frames but the model samples {self.config.num_frames}: "
                          "frames are repeated", RewardInputWarning, stacklevel=6)
        frames = video[sample_frame_indices(video.shape[0], self.config.num_frames).to(video.device)]
        size = self.frame_size_for(*frames.shape[-2:])
        if tuple(frames.shape[-2:]) != size:
            frames = F.interpolate(frames, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        frames = (frames - self.image_mean.to(frames)) / self.image_std.to(frames)
        return patchify_video(frames, self.patch_size, self.temporal_patch_size, self.merge_size)

    def text_inputs(self, prompts: list[str], video_token_counts: list[int]) -> dict[str, torch.Tensor]:
        """input_ids / attention_mask (right padded) and the position of each reward token per item."""
        prompt_ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        limit = self.config.max_prompt_tokens
        long = [(len(ids), p) for ids, p in zip(prompt_ids, prompts) if len(ids) > limit]
        if long:
            warnings.warn(f"{len(long)} prompt(s) longer than {limit} tokens were truncated (e.g. {long[0][0]} "
                          f"tokens: {long[0][1][:60]!r}...)", RewardInputWarning, stacklevel=6)
        before_video, between, after_prompt = self._template_parts
        sequences, prompt_spans = [], []
        for ids, n_video in zip(prompt_ids, video_token_counts):
            video = [self.vision_start_id] + [self.video_token_id] * n_video + [self.vision_end_id]
            start = len(before_video) + len(video) + len(between)
            prompt_spans.append((start, start + len(ids[:limit])))
            sequences.append(before_video + video + between + ids[:limit] + after_prompt)
        length = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for i, s in enumerate(sequences):
            input_ids[i, : len(s)] = torch.tensor(s)
            attention_mask[i, : len(s)] = 1
        positions = {}
        for dim, token_id in self.reward_token_ids.items():
            found = (input_ids == token_id) & attention_mask.bool()
            if not bool((found.sum(dim=1) == 1).all()):
                raise ValueError(f"the {REWARD_TOKENS[dim]} token must appear exactly once in every input (a "
                                 "prompt that contains it?)")
            positions[dim] = found.int().argmax(dim=1)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "positions": positions,
                "prompt_spans": prompt_spans}

    # ----------------------------------------------------------------------------------- scoring
    def reward_hidden_states(self, pixels: list[torch.Tensor], prompts: list[str]) -> dict[str, torch.Tensor]:
        """The last hidden state at each reward token: {dim: (B, hidden)}."""
        hidden, text = self.last_hidden_states(pixels, prompts)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return {d: hidden[rows, text["positions"][d].to(hidden.device)] for d in DIMENSIONS}

    def last_hidden_states(self, pixels: list[torch.Tensor], prompts: list[str]
                           ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The language model's last hidden states over the whole template, (B, L, hidden), and `text_inputs`'s
        dict (token ids, reward-token positions, prompt spans)."""
        device = self.device
        patches, grids = [], []
        for item in pixels:
            # preprocessing in float32 (antialiased resizing has no half-precision CPU kernel), then the model's dtype
            p, grid = self.video_patches(item.to(device=device, dtype=torch.float32))
            patches.append(p.to(self.dtype))
            grids.append(grid)
        merge = self.merge_size**2
        text = self.text_inputs(prompts, [t * h * w // merge for t, h, w in grids])
        input_ids = text["input_ids"].to(device)
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=text["attention_mask"].to(device),
            pixel_values_videos=torch.cat(patches),
            video_grid_thw=torch.tensor(grids, device=device),
            mm_token_type_ids=(input_ids == self.video_token_id).int() * 2,  # 0 text, 2 video
            use_cache=False,
        )
        return out.last_hidden_state, text

    def _score_pixels(self, pixels, prompts, fps) -> dict[str, torch.Tensor]:
        states = self.reward_hidden_states(pixels, prompts)
        scores = {}
        for index, dim in enumerate(DIMENSIONS):
            out = self.head(states[dim].to(self.head.weight.dtype))
            scores[dim] = out[:, 0] if self.config.head == "shared" else out[:, index]
        return scores

    # ----------------------------------------------------------------------------------- training
    def loss(self, batch) -> tuple[torch.Tensor, dict[str, Any]]:
        """Per-dimension BTT (or BT) loss on a batch of pairs (list of PreferencePair or a collate dict).

        Labels per dimension come from the pairs' `labels` (VQ / MQ / TA: 1, 0, 0.5; missing -> masked out);
        pairs without any per-dimension label use their overall `label` for every dimension. Metrics: loss,
        loss and accuracy per dimension, number of valid labels."""
        from genalign.losses.reward import bt_loss, btt_loss

        batch = as_reward_batch(batch)
        n = len(batch["prompt"])
        raw = self._raw_scores(list(batch["media_a"]) + list(batch["media_b"]), list(batch["prompt"]) * 2,
                               fps=list(batch["fps_a"]) + list(batch["fps_b"]), batch_size=2 * n, track_grad=True)
        scores = torch.stack([raw[d] for d in DIMENSIONS], dim=1)  # (2n, 3)
        labels = batch["labels"]
        if labels:
            nan = torch.full((n,), float("nan"))
            label = torch.stack([labels.get(d, nan).float() for d in DIMENSIONS], dim=1)
        else:
            label = batch["label"].float()[:, None].expand(n, len(DIMENSIONS))
        label = label.to(scores.device)
        if self.config.loss == "btt":
            loss, stats = btt_loss(scores[:n], scores[n:], label, theta=self.config.tie_theta)
        else:
            loss, stats = bt_loss(scores[:n], scores[n:], label, ties="mask")
        metrics = {"loss": loss.detach(), "accuracy": stats["accuracy"], "valid_labels": stats["num_valid"]}
        with torch.no_grad():
            delta = scores[:n] - scores[n:]
            for i, dim in enumerate(DIMENSIONS):
                metrics[f"loss/{dim}"] = stats["loss_per_dim"][i]
                decided = (label[:, i] == 1) | (label[:, i] == 0)
                right = torch.where(label[:, i] == 1, delta[:, i] > 0, delta[:, i] < 0)
                metrics[f"accuracy/{dim}"] = right[decided].float().mean() if decided.any() else torch.tensor(
                    float("nan"))
        return loss, metrics

    # ----------------------------------------------------------------------------------- checkpoints
    def _config(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self.config)))

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone's weights without LoRA layers (peft renames wrapped weights `*.base_layer.*`)."""
        return {k.replace(".base_layer", ""): v for k, v in self.base_model.state_dict().items() if "lora_" not in k}

    def non_lora_state_dict(self) -> dict[str, torch.Tensor]:
        """Head, reward-token embedding rows and (when trained) the vision tower."""
        ids = torch.tensor([self.reward_token_ids[d] for d in DIMENSIONS])
        state = {"head.weight": self.head.weight,
                 "reward_token_embeddings": self.base_model.get_input_embeddings().weight[ids]}
        if self.config.train_vision:
            state.update({f"visual.{k}": v for k, v in self.base_model.visual.state_dict().items()})
        return {k: v.detach().contiguous().cpu() for k, v in state.items()}

    def save_pretrained(self, directory: str | os.PathLike, save_base: bool | None = None) -> Path:
        """See the module docstring; `save_base` defaults to True unless `config.base_model_path` is set and only
        LoRA is trained (without LoRA the language model itself is trained: its weights must be saved)."""
        if save_base is None:
            save_base = self.config.base_model_path is None or not self.uses_lora
        self._save_base = save_base
        return super().save_pretrained(directory)

    def _save_weights(self, directory: Path) -> None:
        from safetensors.torch import save_file

        if getattr(self, "_save_base", True):
            backbone_dir = directory / "backbone"
            backbone_dir.mkdir(exist_ok=True)
            self.base_model.config.save_pretrained(backbone_dir)
            base = self.base_state_dict()
            if self.config.train_vision:  # the trained tower is in non_lora.safetensors (the published layout)
                base = {k: v for k, v in base.items() if not k.startswith("visual.")}
            save_file({k: v.detach().contiguous().cpu() for k, v in base.items()},
                      str(backbone_dir / "model.safetensors"), metadata={"format": "pt"})
        self.tokenizer.save_pretrained(directory / "tokenizer")
        if self.uses_lora:
            self.backbone.save_pretrained(directory / "adapter")
        save_file(self.non_lora_state_dict(), str(directory / "non_lora.safetensors"))

    def load_non_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        self.head.weight.data.copy_(state.pop("head.weight"))
        rows = state.pop("reward_token_embeddings", None)
        if rows is not None:
            embeddings = self.base_model.get_input_embeddings().weight
            ids = torch.tensor([self.reward_token_ids[d] for d in DIMENSIONS], device=embeddings.device)
            embeddings.data[ids] = rows.to(embeddings)
        visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
        if visual:
            self.base_model.visual.load_state_dict(visual)
        leftover = [k for k in state if not k.startswith("visual.")]
        if leftover:
            raise RewardLoadError(f"unexpected non-LoRA weights: {leftover[:5]}")

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load peft LoRA weights (keys `base_model.model.<module>.lora_A.weight`, no adapter name)."""
        from peft import set_peft_model_state_dict

        expected = {k for k in self.backbone.state_dict() if "lora_" in k}
        result = set_peft_model_state_dict(self.backbone, state)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        loaded = {k for k in expected if not any(k == m for m in (getattr(result, "missing_keys", []) or []))}
        if unexpected or not loaded:
            raise RewardLoadError(f"{source}: LoRA weights do not fit the model (unexpected keys: {unexpected[:5]})")

    @classmethod
    def _from_saved(cls, directory: Path, config: dict[str, Any], base_model: str | os.PathLike | None = None,
                    **kwargs) -> VideoReward:
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        settings = VideoRewardConfig.from_dict(config)
        non_lora = load_file(str(directory / "non_lora.safetensors"))
        if (directory / "backbone").is_dir():
            backbone = _load_saved_backbone(directory / "backbone", non_lora)
        else:
            backbone = _load_backbone(base_model or settings.base_model_path, directory)
        tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer")
        model = cls(backbone, tokenizer, settings, **kwargs)
        if model.uses_lora:
            adapter_file = directory / "adapter" / "adapter_model.safetensors"
            if not adapter_file.is_file():
                raise RewardLoadError(f"{str(directory)!r}: LoRA model without {str(adapter_file)!r}")
            model.load_adapter_state_dict(load_file(str(adapter_file)), str(adapter_file))
        model.load_non_lora_state_dict(non_lora)
        return model

    # ----------------------------------------------------------------------------------- published layout
    @classmethod
    def _from_published(cls, directory: Path, base_model: str | os.PathLike | None = None,
                        prompt_template: str | None = None, tokenizer=None, **kwargs) -> VideoReward:
        """A VideoAlign checkpoint folder (module docstring)."""
        meta = {}
        if (directory / "model_config.json").is_file():
            meta = json.loads((directory / "model_config.json").read_text())
        data_config = meta.get("data_config", {}) or {}
        base_model = base_model or (meta.get("model_config", {}) or {}).get("model_name_or_path")
        if base_model is None or not Path(base_model).is_dir():
            raise RewardLoadError(f"{str(directory)!r}: pass base_model= a local Qwen2-VL folder (the checkpoint "
                                  f"names {base_model!r}, which is not a local folder; no hub access)")
        checkpoint = _find_published_checkpoint(directory)
        adapter_config = checkpoint / "adapter_config.json"
        lora = json.loads(adapter_config.read_text()) if adapter_config.is_file() else None

        state = _published_non_lora_state(checkpoint)
        head_weight = state.get("rm_head.weight")
        if head_weight is None:
            raise RewardLoadError(f"{str(checkpoint)!r}: no reward head (rm_head.weight) in the non-LoRA / full state")
        settings = {"head": "shared" if head_weight.shape[0] == 1 else "per_dimension", "base_model_path": str(base_model)}
        if data_config.get("fps"):
            settings["fps"] = float(data_config["fps"])
        if data_config.get("num_frames"):
            settings["num_frames"] = int(data_config["num_frames"])
        if data_config.get("max_frame_pixels"):
            settings["max_pixels"] = int(data_config["max_frame_pixels"])
        if lora is not None:
            targets = lora.get("target_modules") or list(LORA_TARGETS)
            settings.update(lora_rank=int(lora["r"]), lora_alpha=float(lora.get("lora_alpha", lora["r"])),
                            lora_target_modules=targets if isinstance(targets, str) else tuple(targets))
        else:
            settings["lora_rank"] = 0
        if prompt_template is None:
            warnings.warn("the published VideoReward was trained with its own prompt template: pass "
                          "prompt_template= (with {video}, {prompt} and the three reward tokens) to reproduce its "
                          "scores; using genalign's default template", RewardInputWarning, stacklevel=3)
        else:
            settings["prompt_template"] = prompt_template

        backbone = _load_backbone(base_model, directory)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(base_model)
        model = cls(backbone, tokenizer, VideoRewardConfig(**settings), **kwargs)
        if lora is not None:
            model.load_adapter_state_dict(_published_adapter_state(checkpoint), str(checkpoint))
        model.head.weight.data.copy_(head_weight)
        rest = {k: v for k, v in state.items() if k != "rm_head.weight" and not k.startswith("lm_head.")}
        if rest:
            target = model.base_model
            own = target.state_dict()
            renamed = {}
            for key, value in rest.items():
                if key not in own:  # under LoRA, wrapped weights are `*.base_layer.weight`
                    wrapped = re.sub(r"\.(weight|bias)$", r".base_layer.\1", key)
                    key = wrapped if wrapped in own else key
                renamed[key] = value
            unknown = [k for k in renamed if k not in own]
            if unknown:
                raise RewardLoadError(f"{str(checkpoint)!r}: weights that fit no parameter: {unknown[:5]}")
            target.load_state_dict(renamed, strict=False)
        if meta.get("inference_config"):
            ic = meta["inference_config"]
            model.set_normalization({d: {"mean": ic[f"{d}_mean"], "std": ic[f"{d}_std"]}
                                     for d in DIMENSIONS if f"{d}_mean" in ic})
        return model


# ------------------------------------------------------------------------------------------- loading helpers
def _load_backbone(path, directory: Path) -> nn.Module:
    from transformers import Qwen2VLModel

    if path is None or not Path(path).is_dir():
        raise RewardLoadError(f"{str(directory)!r} has no backbone/ folder and names no local base model "
                              f"({path!r}); pass base_model=")
    # a Qwen2VLForConditionalGeneration folder loads too (its lm_head is left out)
    return Qwen2VLModel.from_pretrained(path).eval()


def _load_saved_backbone(folder: Path, non_lora: dict[str, torch.Tensor]) -> nn.Module:
    """The `backbone/` folder `save_pretrained` writes. With a trained vision tower its weights are only in
    non_lora.safetensors (folders written before kept a copy in the backbone too: both load)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoConfig, Qwen2VLModel

    weights = folder / "model.safetensors"
    with safe_open(str(weights), framework="pt") as fh:  # names only: the tensors are read once, below
        names = fh.keys()
    if any(k.startswith("visual.") for k in names):
        return Qwen2VLModel.from_pretrained(folder).eval()
    tower = {k: v for k, v in non_lora.items() if k.startswith("visual.")}
    if not tower:
        raise RewardLoadError(f"{str(weights)!r} has no vision tower and non_lora.safetensors none either: "
                              "an incomplete checkpoint folder")
    state = {**load_file(str(weights)), **tower}
    return Qwen2VLModel.from_pretrained(None, config=AutoConfig.from_pretrained(folder), state_dict=state).eval()


def qwen2vl_model_key(key: str) -> str:
    """A parameter name of a published Qwen2-VL reward checkpoint -> the name inside `Qwen2VLModel`
    (transformers 5), or "rm_head.*" / "lm_head.*" unchanged. Reads transformers 4 names (`model.layers.*`,
    `visual.*`) and 5 names (`model.language_model.*`, `model.visual.*`), under peft's `base_model.model.`."""
    for prefix in ("module.", "base_model.model."):
        key = key.removeprefix(prefix)
    if key.startswith(("rm_head.", "lm_head.", "visual.", "language_model.")):
        return key
    if key.startswith(("model.language_model.", "model.visual.")):
        return key[len("model."):]
    if key.startswith("model."):  # transformers 4: the text model was `model`
        return "language_model." + key[len("model."):]
    return key


def _find_published_checkpoint(directory: Path) -> Path:
    def has_weights(folder: Path) -> bool:
        return (folder / "adapter_config.json").is_file() or any(
            (folder / n).is_file() for n in ("non_lora_state_dict.pth", "non_lora_state_dict.safetensors",
                                             "model.safetensors", "pytorch_model.bin", "reward_model.pt"))

    if has_weights(directory):
        return directory
    steps = sorted((int(m.group(1)), p) for p in directory.glob("checkpoint-*")
                   if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and has_weights(p))
    if not steps:
        raise RewardLoadError(f"{str(directory)!r}: no VideoAlign checkpoint (adapter_config.json, "
                              "non_lora_state_dict.pth or a full state dict) in it or in a checkpoint-<step>/ folder")
    return steps[-1][1]


def _read_state_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RewardLoadError(f"cannot read {str(path)!r} ({type(e).__name__}: {e})") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def _published_non_lora_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    for name in ("non_lora_state_dict.safetensors", "non_lora_state_dict.pth", "model.safetensors",
                 "pytorch_model.bin", "reward_model.pt"):
        if (checkpoint / name).is_file():
            return {qwen2vl_model_key(k): v for k, v in _read_state_file(checkpoint / name).items()}
    return {}


def _published_adapter_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (checkpoint / name).is_file():
            state = _read_state_file(checkpoint / name)
            return {"base_model.model." + qwen2vl_model_key(k): v for k, v in state.items()}
    raise RewardLoadError(f"{str(checkpoint)!r}: adapter_config.json but no adapter_model.safetensors / .bin")


# ------------------------------------------------------------------------------------------- tiny builders
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|video_pad|>", "<|image_pad|>")


def build_tiny_qwen2vl_tokenizer(extra_text: str = ""):
    """A real `Qwen2Tokenizer` (byte-level BPE, Qwen2's pre-tokenizer) with a small vocabulary learned offline
    from the default template and the world's words, plus Qwen2-VL's chat / vision special tokens. For tests
    and the world's tiny models; the reward tokens are added by VideoReward."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from genalign.world.grammar import VOCABULARY

    corpus = [DEFAULT_TEMPLATE.replace("{video}", "").replace("{prompt}", ""), " ".join(VOCABULARY), extra_text]
    corpus += [" " + w for w in VOCABULARY]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=512, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    learned = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=learned["vocab"], merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": list(TINY_SPECIAL_TOKENS[1:])})
    return tokenizer


def tiny_qwen2vl_backbone(tokenizer, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                          vision_width: int = 32, vision_depth: int = 2, patch_size: int = 4):
    """A random-init `Qwen2VLModel` small enough for tests (about 0.15M parameters), ids matched to
    `tokenizer` (see `build_tiny_qwen2vl_tokenizer`)."""
    from transformers import Qwen2VLConfig, Qwen2VLModel

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in TINY_SPECIAL_TOKENS}
    heads = 4
    half_head = hidden_size // heads // 2
    mrope = [half_head - 2 * (half_head // 3), half_head // 3, half_head // 3]  # temporal, height, width
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_layers, "num_attention_heads": heads, "num_key_value_heads": 2,
            "max_position_embeddings": 1024, "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
            "rope_parameters": {"rope_type": "default", "mrope_section": mrope, "rope_theta": 10000.0},
        },
        vision_config={
            "depth": vision_depth, "embed_dim": vision_width, "hidden_size": hidden_size, "num_heads": 2,
            "patch_size": patch_size, "spatial_merge_size": 2, "temporal_patch_size": 2, "mlp_ratio": 2,
        },
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    return Qwen2VLModel(config).eval()


def tiny_video_reward(seed: int = 0, **settings) -> VideoReward:
    """A tiny random-init VideoReward on 8-frame 32x32 clips at 8 fps (tests, examples, the world)."""
    tokenizer = build_tiny_qwen2vl_tokenizer()
    backbone = tiny_qwen2vl_backbone(tokenizer, seed=seed)
    config = VideoRewardConfig(**{"fps": 8.0, "num_frames": 8, "frame_size": (32, 32), "lora_rank": 4,
                                  "lora_alpha": 8.0, "max_prompt_tokens": 32, **settings})
    torch.manual_seed(seed + 1)
    return VideoReward(backbone, tokenizer, config).eval()
