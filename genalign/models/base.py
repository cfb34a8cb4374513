"""One interface over every generator genalign trains or samples: `velocity(x_t, t, cond)`.

An adapter wraps a loaded diffusers pipeline (its denoiser, text encoders, tokenizers, VAE and scheduler) and
speaks the flow convention of `genalign.flow`: t in [0, 1], t = 1 is noise, the output is v = eps - x0 in the
*normalised* latent space (the space the denoiser sees). Losses, trainers, samplers and guidance only ever call
this interface, so each of them is written once for SD3, FLUX, Wan and UNet models alike.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..files import shared_as_written

Cond = dict[str, torch.Tensor]
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3")


@contextlib.contextmanager
def quiet_type_warnings(components: list[str]):
    """Drop diffusers' "Expected types for NAME" warning for the named components while loading a pipeline.

    diffusers checks each component against the pipeline's type annotations (WanPipeline's `vae` is an
    AutoencoderKLWan) and warns on every load of a folder whose component is genalign's own class in that place
    (the world video model's per-frame VAE), which is by design. Every other warning passes.
    """
    import logging

    prefixes = tuple(f"Expected types for {name}:" for name in components)

    def keep(record: logging.LogRecord) -> bool:
        return not (prefixes and record.getMessage().startswith(prefixes))

    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


class ModelLoadError(ValueError):
    """A model folder or hub id that cannot be used as asked (wrong family, empty tokenizer, ...)."""


@dataclass
class LoraSpec:
    rank: int = 8
    alpha: float | None = None  # defaults to rank (scale 1)
    target_modules: tuple[str, ...] | None = None  # None: the family's attention projections
    dropout: float = 0.0
    adapter_name: str = "default"


class FlowAdapter:
    """Base class. Subclasses set `family`, `pipeline_class` and implement the model-specific parts."""

    family: str = ""
    pipeline_class_names: tuple[str, ...] = ()
    default_lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    is_video: bool = False

    def __init__(self, pipe, device: str | torch.device | None = None):
        self.pipe = pipe
        self.released_text_encoders: list[str] = []  # see release_text_encoders
        for m in self.text_encoders():
            m.requires_grad_(False).eval()
        if getattr(pipe, "vae", None) is not None:
            pipe.vae.requires_grad_(False).eval()
        self.denoiser.eval()
        if device is not None:
            self.to(device)
        validate_tokenizers(pipe)

    # --------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, torch_dtype=None, device=None,
                        text_encoders: str = "load", **kwargs) -> FlowAdapter:
        """Load a pipeline folder (or hub id) of this family and wrap it.

        text_encoders: "load", or "empty": built from their configs on the meta device, no weights read (a local
        folder only; a hub id loads them). For training on a latent cache, which holds every prompt's
        embeddings: the cache's model check reads their configs and two tensors per encoder from the files
        (`first_and_last_parameters`), then `release_text_encoders()` drops them. SD3.5's T5-XXL and two CLIPs
        are 5.6 B parameters that would otherwise be read into host memory only to be dropped.

        Keyword arguments that the adapter's constructor takes (e.g. `max_sequence_length`, FLUX's `guidance`) go
        to it; the rest go to `DiffusionPipeline.from_pretrained`.
        """
        from diffusers import DiffusionPipeline

        own = set(inspect.signature(cls.__init__).parameters) - {"self", "pipe", "device"}
        adapter_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in own}
        check_family(path_or_id, cls)
        kwargs.setdefault("use_safetensors", True)
        if text_encoders not in ("load", "empty"):
            raise ValueError(f"text_encoders must be 'load' or 'empty', got {text_encoders!r}")
        if text_encoders == "empty":
            kwargs = {**empty_text_encoders(path_or_id), **kwargs}
        # Components saved as absent (e.g. SD3 without T5: "text_encoder_3": [null, null]) must be passed as
        # None explicitly, or diffusers refuses the folder.
        own_components = []
        for name, entry in (read_model_index(path_or_id) or {}).items():
            if isinstance(entry, list) and entry == [None, None]:
                kwargs.setdefault(name, None)
            # Components of genalign's own (the world video model's per-frame VAE) are importable code of this
            # package: diffusers loads them only once their module is imported, and never imports it itself.
            if isinstance(entry, list) and isinstance(entry[0], str) and entry[0].startswith("genalign."):
                importlib.import_module(entry[0])
                own_components.append(name)
        try:
            with quiet_type_warnings(own_components):
                pipe = DiffusionPipeline.from_pretrained(str(path_or_id), torch_dtype=torch_dtype, **kwargs)
        except OSError as e:
            raise ModelLoadError(f"could not load a {cls.family} pipeline from {str(path_or_id)!r}: {e}") from e
        # check_family can only read local folders; a hub id is checked once loaded.
        if cls.pipeline_class_names and type(pipe).__name__ not in cls.pipeline_class_names:
            raise ModelLoadError(
                f"{str(path_or_id)!r} holds a {type(pipe).__name__}, not a {cls.family} model "
                f"(expected one of {', '.join(cls.pipeline_class_names)})"
            )
        try:
            return cls(pipe, device=device, **adapter_kwargs)
        except ModelLoadError as e:
            raise ModelLoadError(f"{str(path_or_id)!r}: {e}") from e

    # --------------------------------------------------------------------------------- components
    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    def text_encoders(self) -> list[torch.nn.Module]:
        return [getattr(self.pipe, n) for n in TEXT_ENCODER_NAMES if getattr(self.pipe, n, None) is not None]

    def release_text_encoders(self) -> int:
        """Drop the text encoders from the pipeline (the tokenizers stay) and return how many parameters that
        freed. For training on a latent cache, which holds every prompt's embeddings: the encoders would sit
        unused in memory for the whole run (SD3.5's T5-XXL and two CLIPs: 5.6 B parameters, more than its
        transformer). `encode_prompt` then raises; load the model again to encode new prompts."""
        freed = 0
        for name in TEXT_ENCODER_NAMES:
            module = getattr(self.pipe, name, None)
            if module is not None:
                freed += sum(p.numel() for p in module.parameters())
                setattr(self.pipe, name, None)  # diffusers records the component as absent in the pipeline config
                self.released_text_encoders.append(name)
        return freed

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def to(self, device) -> FlowAdapter:
        self.pipe.to(device)
        return self

    # --------------------------------------------------------------------------------- the interface
    def encode_prompt(self, prompts: list[str]) -> Cond:
        """The conditioning tensors of `prompts` for `velocity`, from the family's text encoders."""
        if self.released_text_encoders:
            raise RuntimeError(
                f"this {self.family} adapter's text encoders ({', '.join(self.released_text_encoders)}) were released "
                "to save memory while training on a latent cache; load the model again to encode new prompts"
            )
        empty = [type(m).__name__ for m in self.text_encoders() if any(p.is_meta for p in m.parameters())]
        if empty:
            raise RuntimeError(f"this {self.family} adapter's text encoders ({', '.join(empty)}) were built empty "
                               "(text_encoders='empty', for training on a latent cache); load the model with "
                               "text_encoders='load' to encode prompts")
        return self._encode_prompt(prompts)

    def _encode_prompt(self, prompts: list[str]) -> Cond:
        raise NotImplementedError

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        raise NotImplementedError

    def latent_shape(self, height: int, width: int, num_frames: int | None = None) -> tuple[int, ...]:
        """Shape of one sample's (unpacked) latents for an image of height x width pixels."""
        f = self.pipe.vae_scale_factor
        return (self.denoiser.config.in_channels, height // f, width // f)

    def latent_normalisation(self, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(shift, scale) with normalised = (raw - shift) * scale, broadcastable against ndim-D latents.

        The AutoencoderKL conventions of the diffusers pipelines: SD3/FLUX `(raw - shift_factor) * scaling_factor`,
        SD1.5 `raw * scaling_factor`, SDXL-style VAEs with per-channel `latents_mean`/`latents_std`
        `(raw - mean) * scaling_factor / std`.
        """
        cfg = self.pipe.vae.config
        scale = torch.tensor(float(cfg.get("scaling_factor", 1.0) or 1.0))
        shift = torch.tensor(float(cfg.get("shift_factor", 0.0) or 0.0))
        view = (1, -1, *([1] * (ndim - 2)))
        if cfg.get("latents_mean") is not None and cfg.get("latents_std") is not None:
            shift = torch.tensor(cfg.latents_mean).view(view)
            scale = scale / torch.tensor(cfg.latents_std).view(view)
        return shift, scale

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> normalised latents (mean of the posterior: deterministic, cacheable)."""
        vae = self.pipe.vae
        raw = vae.encode(pixels.to(vae.dtype)).latent_dist.mean
        shift, scale = (v.to(raw) for v in self.latent_normalisation(raw.ndim))
        return ((raw - shift) * scale).to(self.dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> pixels in [-1, 1]."""
        vae = self.pipe.vae
        latents = latents.to(vae.dtype)
        shift, scale = (v.to(latents) for v in self.latent_normalisation(latents.ndim))
        return vae.decode(latents / scale + shift, return_dict=False)[0]

    @staticmethod
    def cat_cond(conds: list[Cond]) -> Cond:
        """Concatenate conditionings along the batch (e.g. unconditional + conditional for CFG)."""
        return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}

    @staticmethod
    def repeat_cond(cond: Cond, n: int) -> Cond:
        return {k: v.repeat_interleave(n, dim=0) for k, v in cond.items()}

    def default_sampling(self) -> dict[str, Any]:
        """Scheduler shift etc. read from the pipeline's own scheduler config."""
        cfg = self.pipe.scheduler.config
        return {"shift": float(cfg.get("shift", 1.0))}

    def sampling_scheduler(self):
        """A fresh scheduler for `genalign.sampling`: a copy of the pipeline's own. It is stepped with velocities
        and its `timesteps / num_train_timesteps` are flow times t (UNetAdapter returns a flow-matching one)."""
        return copy.deepcopy(self.pipe.scheduler)

    def set_schedule(self, scheduler, num_steps: int, latents: torch.Tensor) -> None:
        """Set sampling timesteps on a copy of the pipeline's scheduler (FLUX overrides it: resolution shift)."""
        scheduler.set_timesteps(num_steps, device=latents.device)

    # --------------------------------------------------------------------------------- LoRA
    def add_lora(self, spec: LoraSpec | None = None) -> str:
        """Attach a fresh LoRA adapter (peft, diffusers naming) to the denoiser; returns its name."""
        from peft import LoraConfig

        spec = spec or LoraSpec()
        config = LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha if spec.alpha is not None else spec.rank,
            target_modules=list(spec.target_modules or self.default_lora_targets),
            lora_dropout=spec.dropout,
            init_lora_weights=True,
        )
        self.denoiser.add_adapter(config, adapter_name=spec.adapter_name)
        return spec.adapter_name

    @contextlib.contextmanager
    def lora_disabled(self):
        """The reference model: the same network with every adapter switched off, and back as it was after.

        The per-layer flag is set directly (genalign.guidance.lora.adapter_state) rather than through
        `disable_adapters()` / `enable_adapters()`: those also flip `requires_grad` of every LoRA parameter and
        re-enable adapters the user had switched off, and on the world model cost 3.4 ms per step vs 0.5 ms."""
        from ..guidance.core import BASE
        from ..guidance.lora import adapter_state

        with adapter_state([self.denoiser], BASE):
            yield

    def lora_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.denoiser, adapter_name=adapter_name)

    def save_lora(self, directory: str | os.PathLike, adapter_name: str = "default") -> Path:
        """Write the adapter so that `pipe.load_lora_weights(directory)` of the stock pipeline loads it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # The peft state dict is passed as is: converting it changes key names that SD3/Flux/Wan loaders
        # then silently skip (ENVIRONMENT.md).
        state = {k: v.detach().contiguous() for k, v in self.lora_state_dict(adapter_name).items()}
        with shared_as_written(directory):  # safetensors writes 0600 files (genalign.files)
            self.pipe.save_lora_weights(directory, **{self.lora_save_kwarg: state}, safe_serialization=True)
        return directory

    lora_save_kwarg = "transformer_lora_layers"

    def load_lora(self, directory: str | os.PathLike, adapter_name: str = "default") -> None:
        self.pipe.load_lora_weights(str(directory), adapter_name=adapter_name)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.denoiser.parameters() if p.requires_grad]


def validate_tokenizers(pipe) -> None:
    """Offline, a hub tokenizer can load EMPTY without an error (ENVIRONMENT.md); refuse it clearly."""
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tok = getattr(pipe, name, None)
        if tok is None:
            continue
        if len(tok) < 8:
            raise ModelLoadError(
                f"{name} has only {len(tok)} tokens: it was probably not found (offline hub lookups return an "
                "empty tokenizer). Point --model at a local folder that contains the tokenizer files."
            )


def empty_text_encoders(folder: str | os.PathLike) -> dict[str, torch.nn.Module]:
    """The pipeline folder's transformers text encoders, built from their configs on the meta device (no memory,
    no weights read), each remembering its folder for `first_and_last_parameters`. {} for a hub id; an encoder
    without model.safetensors (or its sharded index), e.g. only a variant's files, is left to load as usual."""
    import transformers

    if not Path(folder).is_dir():
        return {}
    out = {}
    index = read_model_index(folder) or {}
    for name in TEXT_ENCODER_NAMES:
        entry = index.get(name)
        sub = Path(folder) / name
        weights = (sub / "model.safetensors").is_file() or (sub / "model.safetensors.index.json").is_file()
        if not (isinstance(entry, list) and entry[0] == "transformers" and weights):
            continue
        config = transformers.AutoConfig.from_pretrained(sub)
        with torch.device("meta"):
            module = getattr(transformers, entry[1])(config)
        module.requires_grad_(False)
        module.genalign_weights_folder = str(sub)
        out[name] = module
    return out


def first_and_last_parameters(module: torch.nn.Module) -> list[torch.Tensor]:
    """The module's first and last parameter (a sample that tells checkpoints with one config apart), read from its
    safetensors files when it was built empty (`empty_text_encoders`)."""
    named = list(module.named_parameters())
    picked = named[:1] + named[-1:]
    if not any(p.is_meta for _, p in picked):
        return [p for _, p in picked]
    folder = getattr(module, "genalign_weights_folder", None)
    if folder is None:
        raise ModelLoadError(f"{type(module).__name__} is on the meta device and has no weights folder to read")
    return read_safetensors_tensors(folder, [n for n, _ in picked], aliases=tied_weight_aliases(module))


def tied_weight_aliases(module: torch.nn.Module) -> dict[str, list[str]]:
    """Parameter name -> the other names it is saved under (tied weights: T5's `shared.weight` is also
    `encoder.embed_tokens.weight`, and a checkpoint may hold either)."""
    tied = getattr(module, "_tied_weights_keys", None) or {}
    aliases: dict[str, list[str]] = {}
    for a, b in (tied.items() if isinstance(tied, dict) else []):
        aliases.setdefault(a, []).append(b)
        aliases.setdefault(b, []).append(a)
    return aliases


def read_safetensors_tensors(folder: str | os.PathLike, names: list[str],
                             aliases: dict[str, list[str]] | None = None) -> list[torch.Tensor]:
    """Named tensors from a transformers/diffusers weights folder (model.safetensors or a sharded index), reading
    only those tensors."""
    import json

    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        where = {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    elif (folder / "model.safetensors").is_file():
        with safe_open(folder / "model.safetensors", "pt") as f:
            keys = f.keys()  # a safe_open handle is not iterable
        where = {k: folder / "model.safetensors" for k in keys}
    else:
        raise ModelLoadError(f"{str(folder)!r} has no model.safetensors (or its index) to read weights from")
    out = []
    for name in names:
        key = next((k for k in [name, *(aliases or {}).get(name, [])] if k in where), None)
        if key is None:
            raise ModelLoadError(f"{str(folder)!r}: no tensor {name!r} in its safetensors files")
        with safe_open(where[key], "pt") as f:
            out.append(f.get_tensor(key))
    return out


def read_model_index(path_or_id: str | os.PathLike) -> dict | None:
    import json

    index = Path(path_or_id) / "model_index.json"
    if index.is_file():
        return json.loads(index.read_text())
    return None


def check_family(path_or_id, adapter_cls) -> None:
    """Refuse a pipeline folder of another family before loading gigabytes of weights."""
    p = Path(path_or_id)
    if p.exists() and not p.is_dir():
        raise ModelLoadError(f"{str(p)!r} is a file; expected a diffusers pipeline folder (with model_index.json)")
    if p.is_dir():
        index = read_model_index(p)
        if index is None:
            raise ModelLoadError(f"{str(p)!r} has no model_index.json: not a diffusers pipeline folder")
        cls_name = index.get("_class_name", "?")
        if adapter_cls.pipeline_class_names and cls_name not in adapter_cls.pipeline_class_names:
            raise ModelLoadError(
                f"{str(p)!r} holds a {cls_name}, not a {adapter_cls.family} model "
                f"(expected one of {', '.join(adapter_cls.pipeline_class_names)}); "
                f"use genalign.models.load_adapter to pick the family automatically"
            )

