"""CLIP-based rewards: PickScore (Kirstain et al., "Pick-a-Pic", arXiv 2305.01569) and HPSv2 (Wu et al.,
"Human Preference Score v2", arXiv 2306.09341) style.

    score(I, c) = exp(logit_scale) * cos(f_img(I), f_txt(c))     PickScore (`use_logit_scale=True`, default)
    score(I, c) = cos(f_img(I), f_txt(c))                        HPSv2 (`use_logit_scale=False`)

and the preference probabilities over one prompt's candidates are the softmax of the scores (`probs`). The
training objective (`loss`) is PickScore's: cross-entropy between the softmax over a pair's two scores and the
label distribution (tie = [0.5, 0.5]), `genalign.losses.reward.pickscore_loss`.

Two backends:

- transformers `CLIPModel` + tokenizer. `CLIPReward.from_pretrained(folder)` reads the layout PickScore is
  published in: `config.json` (model_type "clip"), `model.safetensors`, tokenizer files and
  `preprocessor_config.json` (resize / crop size, mean, std). A folder without tokenizer files needs
  `tokenizer=` (CLIP's BPE tokenizer: `build_clip_tokenizer()`); without preprocessor_config.json the vision
  config's image size and CLIP's mean / std are used.
- open_clip. `CLIPReward.from_open_clip("ViT-H-14", "HPS_v2_compressed.pt", use_logit_scale=False)` reads
  HPSv2's layout: an open_clip architecture name plus a checkpoint file holding a state dict (torch
  `weights_only=True`, optionally under a "state_dict" key, or safetensors). Architectures that open_clip does not
  ship are given as a JSON config file (`model_config=`; its file name is the architecture name). A folder with
  `open_clip_config.json` (open_clip's "local-dir" layout, also what `save_pretrained` writes) loads with
  `from_pretrained`; a model whose text config names an `hf_tokenizer_name` reads the transformers tokenizer saved
  in that folder (open_clip's rule; the world's ResNet CLIP is saved so).

Pixels are preprocessed in torch, differentiably, for every input type: resize the shortest side (bicubic,
antialiased), centre crop, normalise with the model's mean / std. This follows the published processors'
steps; resampling is torch's, not PIL's, so pixel values after a resize differ slightly from theirs (none when
the input is already at the crop size).

Videos are scored frame by frame and the frame scores averaged.

No tokenizer is fetched: an offline hub lookup returns an EMPTY tokenizer without an error, so every tokenizer's
size is checked. `build_clip_tokenizer()` builds the real 49408-token CLIP tokenizer from the BPE file open_clip
ships (ids identical to open_clip's tokenizer).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .base import RewardInputWarning, RewardLoadError, RewardModel, as_reward_batch

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_TOKENIZER_SIZE = 16  # an "empty" offline hub tokenizer has 2 tokens


# ------------------------------------------------------------------------------------------- helpers
def build_clip_tokenizer(max_length: int = 77):
    """The CLIP BPE tokenizer (49408 tokens) as a transformers `CLIPTokenizer`, built offline from the
    vocabulary file bundled with open_clip. Its ids equal open_clip's (padding aside: open_clip pads with 0)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    # open_clip names the start / end tokens <start_of_text> / <end_of_text>; CLIP's vocabulary files use
    # <|startoftext|> / <|endoftext|> for the same ids (49406, 49407)
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {renamed.get(token, token): index for token, index in bpe.encoder.items()}
    merges = [tuple(pair) for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    check_tokenizer_size(tokenizer, len(bpe.encoder), "the CLIP tokenizer built from open_clip's BPE file")
    return tokenizer


def check_tokenizer_size(tokenizer, vocab_size: int, where: str) -> None:
    """Fail clearly on an empty tokenizer (what an offline hub lookup returns) or one larger than the model's
    vocabulary (its ids would index past the embedding table)."""
    size = len(tokenizer)
    if size < MIN_TOKENIZER_SIZE:
        raise RewardLoadError(
            f"{where}: the tokenizer holds only {size} tokens. An offline hub lookup returns such an empty tokenizer "
            "without an error; load it from local files (or use genalign.rewards.build_clip_tokenizer())")
    if size > vocab_size:
        raise RewardLoadError(f"{where}: the tokenizer has {size} tokens but the text model only {vocab_size}")


def resize_shortest_and_center_crop(images: torch.Tensor, resize_to: int, crop: tuple[int, int]) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 3, crop_h, crop_w): scale so the shortest side is `resize_to` (bicubic, antialiased),
    then cut the centre. Differentiable; an input already at the crop size is returned unchanged."""
    h, w = images.shape[-2:]
    if (h, w) == tuple(crop):
        return images
    scale = resize_to / min(h, w)
    new_h, new_w = max(crop[0], round(h * scale)), max(crop[1], round(w * scale))
    if (new_h, new_w) != (h, w):
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
        images = images.clamp(0, 1)
    top, left = (new_h - crop[0]) // 2, (new_w - crop[1]) // 2
    return images[..., top:top + crop[0], left:left + crop[1]]


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if isinstance(size, dict):
        if "height" in size:
            return int(size["height"]), int(size["width"])
        edge = size.get("shortest_edge") or size.get("longest_edge")
        return int(edge), int(edge)
    h, w = size
    return int(h), int(w)


def _features(output) -> torch.Tensor:
    """transformers >= 5 returns model outputs from get_*_features (features in pooler_output); older: tensors."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _transformers_tokenizer(tokenizer):
    """The transformers tokenizer behind an open_clip model's tokenizer (itself, or the one open_clip's HFTokenizer
    wraps), else None (open_clip's own BPE tokenizers)."""
    from transformers import PreTrainedTokenizerBase

    inner = getattr(tokenizer, "tokenizer", tokenizer)
    return inner if isinstance(inner, PreTrainedTokenizerBase) else None


def _warn_long_prompts(lengths: list[int], max_length: int, prompts: list[str]) -> None:
    long = [(n, p) for n, p in zip(lengths, prompts) if n > max_length]
    if long:
        n, p = long[0]
        warnings.warn(
            f"{len(long)} prompt(s) longer than the text encoder's {max_length} tokens were truncated (e.g. {n} "
            f"tokens: {p[:60]!r}...)", RewardInputWarning, stacklevel=5)


# ------------------------------------------------------------------------------------------- the model
class CLIPReward(RewardModel):
    """PickScore / HPSv2-style reward on a transformers or open_clip CLIP model (module docstring)."""

    kind = "clip"

    def __init__(
        self,
        clip_model: torch.nn.Module,
        tokenizer,
        *,
        backend: str,
        image_size: int | tuple[int, int] = 224,
        resize_size: int | None = None,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        use_logit_scale: bool = True,
        max_length: int | None = None,
        open_clip_config: dict | None = None,
        **kwargs,
    ):
        super().__init__(("score",), **kwargs)
        if backend not in ("transformers", "open_clip"):
            raise ValueError(f"backend must be 'transformers' or 'open_clip', got {backend!r}")
        self.clip = clip_model
        self.tokenizer = tokenizer
        self.backend = backend
        self.crop_size = _pair(image_size)
        self.resize_size = int(resize_size or min(self.crop_size))
        self.register_buffer("image_mean", torch.tensor(image_mean, dtype=torch.float32).view(3, 1, 1),
                             persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std, dtype=torch.float32).view(3, 1, 1),
                             persistent=False)
        self.use_logit_scale = use_logit_scale
        self.open_clip_config = open_clip_config
        # training objective (set by `genalign train reward`, not saved: it is a choice of the run, not the model)
        self.training_loss = "pickscore"
        self.tie_theta = 5.0
        if backend == "transformers":
            text_config = clip_model.config.text_config
            check_tokenizer_size(tokenizer, text_config.vocab_size, "CLIPReward")
            self.max_length = int(max_length or min(text_config.max_position_embeddings,
                                                    getattr(tokenizer, "model_max_length", 10**9)))
        else:
            self.max_length = int(max_length or getattr(tokenizer, "context_length", 77))
            vocab = getattr(tokenizer, "vocab_size", None)
            if vocab is not None and vocab < MIN_TOKENIZER_SIZE:
                raise RewardLoadError(f"CLIPReward: the open_clip tokenizer holds only {vocab} tokens")
        self.clip.eval()

    # ----------------------------------------------------------------------------------- constructors
    @classmethod
    def from_transformers(cls, clip_model, tokenizer, *, image_size=None, resize_size=None,
                          image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, **kwargs) -> CLIPReward:
        """Wrap an in-memory transformers CLIPModel and its tokenizer (image size: the vision config's)."""
        image_size = image_size or clip_model.config.vision_config.image_size
        return cls(clip_model, tokenizer, backend="transformers", image_size=image_size, resize_size=resize_size,
                   image_mean=image_mean, image_std=image_std, **kwargs)

    @classmethod
    def from_open_clip(cls, model_name: str, checkpoint: str | os.PathLike | None = None, *,
                       model_config: str | os.PathLike | None = None, use_logit_scale: bool = True,
                       model=None, **kwargs) -> CLIPReward:
        """An open_clip architecture (`model_name`, or the JSON file `model_config` whose name is the
        architecture's) with weights from `checkpoint` (HPSv2 layout: a state dict, optionally under
        "state_dict"; torch `weights_only=True` or safetensors). `model=` wraps an already built model."""
        import open_clip

        if model_config is not None:
            model_config = Path(model_config)
            if not model_config.is_file():
                raise FileNotFoundError(f"open_clip model config {str(model_config)!r} does not exist")
            open_clip.add_model_config(model_config)
            model_name = model_config.stem
        config = open_clip.get_model_config(model_name)
        if config is None:
            raise RewardLoadError(f"open_clip has no architecture {model_name!r}; pass its JSON config as "
                                  "model_config=")
        if model is None:
            model = open_clip.create_model(model_name, pretrained=None, load_weights=False)
            if checkpoint is not None:
                checkpoint = Path(checkpoint)
                if not checkpoint.is_file():
                    raise FileNotFoundError(f"checkpoint {str(checkpoint)!r} does not exist")
                try:
                    open_clip.load_checkpoint(model, str(checkpoint), strict=True, weights_only=True)
                except Exception as e:
                    raise RewardLoadError(f"cannot load {str(checkpoint)!r} into open_clip {model_name!r} "
                                          f"({type(e).__name__}: {e})") from e
        tokenizer = open_clip.get_tokenizer(model_name)
        return cls._wrap_open_clip(model, tokenizer, dict(config), use_logit_scale=use_logit_scale, **kwargs)

    @classmethod
    def _wrap_open_clip(cls, model, tokenizer, config: dict, **kwargs) -> CLIPReward:
        import open_clip

        pre = open_clip.get_model_preprocess_cfg(model)
        size = _pair(pre.get("size", 224))
        return cls(model, tokenizer, backend="open_clip", image_size=size,
                   image_mean=tuple(pre.get("mean", OPENAI_CLIP_MEAN)), image_std=tuple(pre.get("std", OPENAI_CLIP_STD)),
                   open_clip_config=config, **kwargs)

    @classmethod
    def _from_transformers_folder(cls, directory: Path, settings: dict[str, Any] | None = None,
                                  tokenizer=None, **kwargs) -> CLIPReward:
        from transformers import AutoTokenizer, CLIPModel

        clip_model = CLIPModel.from_pretrained(directory)
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(directory)
            except Exception as e:
                raise RewardLoadError(f"{str(directory)!r}: cannot load the tokenizer ({type(e).__name__}: {e}); "
                                      "pass tokenizer=") from e
        settings = dict(settings or {})
        pre_file = directory / "preprocessor_config.json"
        if "image_size" not in settings:
            pre = json.loads(pre_file.read_text()) if pre_file.is_file() else {}
            crop = pre.get("crop_size") or pre.get("size") or clip_model.config.vision_config.image_size
            resize = pre.get("size")
            settings["image_size"] = _pair(crop)
            settings["resize_size"] = _pair(resize)[0] if resize is not None else None
            settings["image_mean"] = tuple(pre.get("image_mean", OPENAI_CLIP_MEAN))
            settings["image_std"] = tuple(pre.get("image_std", OPENAI_CLIP_STD))
        return cls(clip_model, tokenizer, backend="transformers", **settings, **kwargs)

    @classmethod
    def _from_open_clip_folder(cls, directory: Path, settings: dict[str, Any] | None = None, **kwargs):
        import open_clip

        config = json.loads((directory / "open_clip_config.json").read_text())
        model = open_clip.create_model(f"local-dir:{directory}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{directory}")
        settings = {k: v for k, v in (settings or {}).items() if k in ("use_logit_scale", "max_length")}
        return cls._wrap_open_clip(model, tokenizer, config.get("model_cfg", {}), **settings, **kwargs)

    @classmethod
    def _from_published(cls, directory: Path, **kwargs) -> CLIPReward:
        if (directory / "open_clip_config.json").is_file():
            return cls._from_open_clip_folder(directory, **kwargs)
        return cls._from_transformers_folder(directory, **kwargs)

    @classmethod
    def _from_saved(cls, directory: Path, config: dict[str, Any], **kwargs) -> CLIPReward:
        settings = dict(config)
        backend = settings.pop("backend")
        if backend == "open_clip":
            return cls._from_open_clip_folder(directory, settings, **kwargs)
        for key in ("image_size", "image_mean", "image_std"):
            settings[key] = tuple(settings[key])
        return cls._from_transformers_folder(directory, settings, **kwargs)

    # ----------------------------------------------------------------------------------- checkpoints
    def _config(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "image_size": list(self.crop_size),
            "resize_size": self.resize_size,
            "image_mean": self.image_mean.flatten().tolist(),
            "image_std": self.image_std.flatten().tolist(),
            "use_logit_scale": self.use_logit_scale,
            "max_length": self.max_length,
        }

    def _save_weights(self, directory: Path) -> None:
        if self.backend == "transformers":
            from transformers import CLIPImageProcessor

            self.clip.save_pretrained(directory)
            self.tokenizer.save_pretrained(directory)
            CLIPImageProcessor(
                size={"shortest_edge": self.resize_size},
                crop_size={"height": self.crop_size[0], "width": self.crop_size[1]},
                image_mean=self.image_mean.flatten().tolist(), image_std=self.image_std.flatten().tolist(),
            ).save_pretrained(directory)
        else:  # open_clip's "local-dir" layout
            from safetensors.torch import save_model

            preprocess = {"size": list(self.crop_size), "mean": self.image_mean.flatten().tolist(),
                          "std": self.image_std.flatten().tolist()}
            (directory / "open_clip_config.json").write_text(
                json.dumps({"model_cfg": self.open_clip_config, "preprocess_cfg": preprocess}, indent=2))
            save_model(self.clip, str(directory / "open_clip_model.safetensors"))
            hf_tokenizer = _transformers_tokenizer(self.tokenizer)
            if hf_tokenizer is not None:  # open_clip reads it back from the folder (text_cfg's hf_tokenizer_name)
                hf_tokenizer.save_pretrained(directory)

    # ----------------------------------------------------------------------------------- scoring
    def _tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        # a transformers tokenizer: the transformers backend's, or one under an open_clip model (bare or in
        # open_clip's HFTokenizer); else open_clip's own BPE tokenizer
        hf_tokenizer = self.tokenizer if self.backend == "transformers" else _transformers_tokenizer(self.tokenizer)
        if hf_tokenizer is not None:
            _warn_long_prompts([len(ids) for ids in hf_tokenizer(prompts)["input_ids"]], self.max_length, prompts)
            enc = hf_tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt")
            if self.backend == "transformers":
                return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
            return {"text": enc["input_ids"]}
        if hasattr(self.tokenizer, "encode"):  # open_clip's SimpleTokenizer: + start and end tokens
            _warn_long_prompts([len(self.tokenizer.encode(p)) + 2 for p in prompts], self.max_length, prompts)
        return {"text": self.tokenizer(prompts, context_length=self.max_length)}

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm text features (N, E)."""
        tokens = {k: v.to(self.device) for k, v in self._tokenize(prompts).items()}
        if self.backend == "transformers":
            features = _features(self.clip.get_text_features(**tokens))
        else:
            features = self.clip.encode_text(tokens["text"])
        return F.normalize(features.float(), dim=-1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (N, 3, crop_h, crop_w) -> unit-norm image features (N, E)."""
        x = (images - self.image_mean.to(images)) / self.image_std.to(images)
        if self.backend == "transformers":
            features = _features(self.clip.get_image_features(pixel_values=x))
        else:
            features = self.clip.encode_image(x)
        return F.normalize(features.float(), dim=-1)

    def _score_pixels(self, pixels, prompts, fps) -> dict[str, torch.Tensor]:
        # every frame of every item, resized to the crop size; `owner[i]` = the item frame i belongs to
        frames, owner = [], []
        for index, item in enumerate(pixels):
            item = item.to(device=self.device, dtype=torch.float32)  # resized in float32, then the model's dtype
            item = item[None] if item.ndim == 3 else item
            frames.append(resize_shortest_and_center_crop(item, self.resize_size, self.crop_size))
            owner += [index] * item.shape[0]
        image_features = self.encode_images(torch.cat(frames).to(self.dtype))
        text_features = self.encode_text(prompts)
        owner = torch.tensor(owner, device=image_features.device)
        cosine = (image_features * text_features[owner]).sum(dim=-1)
        scale = self.clip.logit_scale.float().exp().reshape(()) if self.use_logit_scale else 1.0
        frame_scores = scale * cosine
        # videos: the mean over their frames
        totals = torch.zeros(len(pixels), device=frame_scores.device).index_add(0, owner, frame_scores)
        counts = torch.bincount(owner, minlength=len(pixels)).to(frame_scores.dtype)
        return {"score": totals / counts}

    # ----------------------------------------------------------------------------------- training
    def loss(self, batch) -> tuple[torch.Tensor, dict[str, Any]]:
        """The training loss on one batch of pairs (list of PreferencePair or a collate dict). `training_loss`
        "pickscore": PickScore's cross-entropy of softmax([s_A, s_B]) against [label, 1 - label]; "btt":
        Bradley-Terry with ties (theta `tie_theta`) on s_A - s_B, which gives ties their own probability mass
        instead of a soft label. Metrics: loss, accuracy (decided pairs), margin."""
        from genalign.losses.reward import btt_loss, pickscore_loss

        batch = as_reward_batch(batch)
        n = len(batch["prompt"])
        raw = self._raw_scores(list(batch["media_a"]) + list(batch["media_b"]), list(batch["prompt"]) * 2,
                               fps=list(batch["fps_a"]) + list(batch["fps_b"]), batch_size=2 * n, track_grad=True)
        scores = raw["score"]
        label = batch["label"].to(scores.device)
        if self.training_loss == "btt":
            loss, stats = btt_loss(scores[:n], scores[n:], label, theta=self.tie_theta)
        elif self.training_loss == "pickscore":
            loss, stats = pickscore_loss(scores[:n], scores[n:], label)
        else:
            raise ValueError(f"CLIPReward.training_loss must be 'pickscore' or 'btt', got {self.training_loss!r}")
        metrics = {"loss": loss.detach(), "accuracy": stats["accuracy"], "margin": stats["margin_mean"],
                   "pairs": stats["num_valid"]}
        return loss, metrics


# ------------------------------------------------------------------------------------------- tiny builder
def tiny_clip_reward(seed: int = 0, image_size: int = 32, **kwargs) -> CLIPReward:
    """A random-init PickScore-style reward on a tiny transformers CLIP (2 layers, width 32) with the world's
    word-level tokenizer: for tests, examples and the world's reward models."""
    from transformers import CLIPConfig, CLIPModel

    from genalign.world.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": tokenizer.model_max_length,
            "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "image_size": image_size, "patch_size": 8,
        },
        projection_dim=16,
    )
    return CLIPReward.from_transformers(CLIPModel(config).eval(), tokenizer, **kwargs)
