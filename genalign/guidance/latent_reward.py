"""Noise-aware latent reward models for Flow-NRG (ALGORITHMS.md section 5).

The interface (any object with these works with NRG; `LatentRewardModel` below is genalign's network):

    scores = reward(x_t, t, cond)      # dict[str, Tensor[B]], one entry per dimension, differentiable in x_t
    reward.dims                         # ("VQ", "MQ", "TA"), the keys of `scores`
    reward.latent_space                 # id of the latent space it reads (`latent_space_id(adapter)`)
    reward.latent_shape                 # one sample's latent shape it was trained at, (C, H, W) or (C, F, H, W)
    reward.conditioning                 # "cond" (the generator's prompt encodings, a Cond dict), "prompts"
                                        # (a list of strings) or "none"

x_t are the generator's *normalised, unpacked* latents at flow time t (t = 1 is noise, `genalign.flow`); t has
shape (B,). The model must be noise-aware (trained on x_t with t as an input): a clean-latent model used for
guidance loses to the plain generator (paper Table 7).

`LatentRewardModel` trunks (`LatentRewardConfig.trunk`):
- "conv": a small standalone conv net (2-D, or 3-D for video latents) with FiLM time/text conditioning,
  global pooling and one linear head per dimension;
- "mlp": the flattened latent, t and text embedding through an MLP (for toy and tiny latents);
- "transformer": the first k blocks of the generator's own flow transformer (SD3, FLUX or Wan; which blocks the
  paper used is unpublished, so k is configurable), its token features mean-pooled into the heads. Built with
  `LatentRewardModel.from_transformer(transformer, k, ...)`, which copies those blocks' weights.

Checkpoints: `save_pretrained(dir)` writes `model.safetensors` and `genalign_latent_reward.json` (the config with
the latent-space id and latent shape); `from_pretrained(dir, latent_space=..., latent_shape=...)` refuses a model
made for another latent space or resolution before anything is sampled.

Training: `genalign train latent-reward` (`genalign.trainers.latent_reward`) on preference pairs (pairs of clean
latents noised with the SAME t and noise, scored, and compared with the tie-aware BTT or plain BT loss of
`genalign.losses.reward`; `pair_loss` below is that loss for one batch) and / or by distilling a clean scorer's
per-dimension scores (MSE). The world ships one for its image model: `genalign.world.latent_reward_path("image")`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import flow
from ..files import share_like_umask
from .core import GuidanceError

CONFIG_NAME = "genalign_latent_reward.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


class LatentRewardLoadError(GuidanceError):
    """A latent reward checkpoint that cannot be used here (missing, another latent space or resolution)."""


# ------------------------------------------------------------------------------------------- latent space id
def latent_space_id(adapter) -> str:
    """A stable id of a generator's latent space: VAE class, latent channels, spatial (and temporal) factor and a
    hash of the latent normalisation constants. Two pipelines sharing a VAE (SD3 and SD3.5) share the id."""
    pipe = adapter.pipe
    vae = pipe.vae
    shape = adapter.latent_shape(64, 64, 5 if adapter.is_video else None)
    parts = [type(vae).__name__, f"c{shape[0]}"]
    if adapter.is_video:
        parts += [f"x{pipe.vae_scale_factor_spatial}", f"t{pipe.vae_scale_factor_temporal}"]
    else:
        parts.append(f"x{pipe.vae_scale_factor}")
    shift, scale = adapter.latent_normalisation(len(shape) + 1)
    consts = [round(float(v), 6) for v in torch.cat([torch.as_tensor(shift).reshape(-1),
                                                     torch.as_tensor(scale).reshape(-1)])]
    parts.append(hashlib.sha1(json.dumps(consts).encode()).hexdigest()[:8])
    return ":".join(parts)


def reward_dims(reward) -> tuple[str, ...]:
    dims = getattr(reward, "dims", None) or getattr(reward, "dimensions", None)
    if not dims:
        raise GuidanceError(f"{type(reward).__name__} has no `dims`: not a latent reward model")
    return tuple(dims)


def check_compatible(reward, latent_space: str, latent_shape: Sequence[int]) -> None:
    """Refuse a latent reward model made for another latent space or latent resolution (GuidanceError)."""
    reward_dims(reward)
    space = getattr(reward, "latent_space", None)
    if not space:
        raise GuidanceError(f"{type(reward).__name__} declares no `latent_space`; NRG needs to know which latents "
                            "it reads")
    if space != latent_space:
        raise GuidanceError(f"the latent reward model reads latent space {space!r}, but this pipeline samples "
                            f"{latent_space!r} (another VAE / normalisation)")
    shape = getattr(reward, "latent_shape", None)
    if shape and tuple(shape) != tuple(latent_shape):
        raise GuidanceError(f"the latent reward model was made for latents of shape {tuple(shape)}, but this call "
                            f"samples {tuple(latent_shape)} (another resolution or number of frames)")


# ------------------------------------------------------------------------------------------- config
@dataclass
class LatentRewardConfig:
    dims: tuple[str, ...] = ("VQ", "MQ", "TA")
    latent_space: str = ""
    latent_shape: tuple[int, ...] = ()  # (C, H, W) or (C, F, H, W)
    trunk: str = "conv"  # conv | mlp | transformer
    hidden: int = 64
    depth: int = 3
    time_dim: int = 64
    cond_key: str | None = "pooled_prompt_embeds"  # which Cond entry conditions the standalone trunks
    cond_dim: int = 0  # 0: unconditional (standalone trunks)
    # transformer trunk
    transformer_class: str | None = None
    transformer_config: dict | None = None
    num_blocks: int = 0
    num_train_timesteps: int = 1000
    guidance: float = 3.5  # FLUX guidance-distilled trunks: the guidance input when the cond holds none
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.dims = tuple(self.dims)
        self.latent_shape = tuple(int(s) for s in self.latent_shape)
        if self.trunk not in ("conv", "mlp", "transformer"):
            raise GuidanceError(f"unknown latent reward trunk {self.trunk!r} (conv, mlp or transformer)")
        if not self.dims or len(set(self.dims)) != len(self.dims):
            raise GuidanceError(f"dims must be distinct names, got {self.dims}")
        if self.trunk != "transformer" and len(self.latent_shape) not in (3, 4):
            raise GuidanceError(f"latent_shape must be (C, H, W) or (C, F, H, W), got {self.latent_shape}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["dims"], d["latent_shape"] = list(self.dims), list(self.latent_shape)
        return {"format_version": FORMAT_VERSION, "kind": "latent_reward", **d}

    @classmethod
    def from_json(cls, d: Mapping) -> LatentRewardConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ------------------------------------------------------------------------------------------- building blocks
def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of flow time t in [0, 1] (scaled by 1000 like the generators' timesteps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float().reshape(-1, 1) * 1000.0 * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


class _FiLMBlock(nn.Module):
    def __init__(self, conv, channels: int, emb_dim: int, downsample: bool):
        super().__init__()
        groups = math.gcd(8, channels)
        self.norm1, self.conv1 = nn.GroupNorm(groups, channels), conv(channels, channels, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * channels)
        self.norm2, self.conv2 = nn.GroupNorm(groups, channels), conv(channels, channels, 3, padding=1)
        self.down = conv(channels, channels, 3, stride=2, padding=1) if downsample else nn.Identity()

    def forward(self, h, emb):
        scale, shift = self.film(emb).chunk(2, dim=1)
        view = (h.shape[0], -1, *([1] * (h.ndim - 2)))
        r = self.conv1(nn.functional.silu(self.norm1(h)))
        r = self.norm2(r) * (1 + scale.view(view)) + shift.view(view)
        h = h + self.conv2(nn.functional.silu(r))
        return self.down(h)


class _FeaturesReady(Exception):
    def __init__(self, features):
        self.features = features


def _capture_before_norm_out(module, args, kwargs):
    hidden = args[0] if args else kwargs.get("x", kwargs.get("hidden_states"))
    raise _FeaturesReady(hidden)


# ------------------------------------------------------------------------------------------- the model
class LatentRewardModel(nn.Module):
    """Noise-aware multi-dimensional reward on generator latents: forward(x_t, t, cond) -> {dim: (B,)}."""

    def __init__(self, config: LatentRewardConfig):
        super().__init__()
        self.config = config
        c = config
        emb = c.hidden
        if c.trunk in ("conv", "mlp"):
            self.time_mlp = nn.Sequential(nn.Linear(c.time_dim, emb), nn.SiLU(), nn.Linear(emb, emb))
            self.cond_proj = nn.Linear(c.cond_dim, emb) if c.cond_dim else None
        if c.trunk == "conv":
            conv = nn.Conv3d if len(c.latent_shape) == 4 else nn.Conv2d
            self.stem = conv(c.latent_shape[0], c.hidden, 3, padding=1)
            size = min(c.latent_shape[-2:])
            blocks = []
            for _ in range(c.depth):
                blocks.append(_FiLMBlock(conv, c.hidden, emb, downsample=size > 1))
                size = (size + 1) // 2
            self.blocks = nn.ModuleList(blocks)
            self.out_norm = nn.GroupNorm(math.gcd(8, c.hidden), c.hidden)
            feat = c.hidden
        elif c.trunk == "mlp":
            n_in = math.prod(c.latent_shape) + emb
            layers: list[nn.Module] = []
            for i in range(c.depth):
                layers += [nn.Linear(n_in if i == 0 else c.hidden, c.hidden), nn.SiLU()]
            self.mlp = nn.Sequential(*layers)
            feat = c.hidden
        else:
            self.trunk = _build_trunk(c.transformer_class, c.transformer_config, c.num_blocks)
            self.trunk.norm_out.register_forward_pre_hook(_capture_before_norm_out, with_kwargs=True)
            for mod in (self.trunk.norm_out, getattr(self.trunk, "proj_out", None)):
                if mod is not None:
                    mod.requires_grad_(False)  # never reached: features are taken before them
            feat = _trunk_width(self.trunk)
            self.pre_head = nn.Sequential(nn.LayerNorm(feat), nn.Linear(feat, c.hidden), nn.SiLU())
            feat = c.hidden
        # One linear head per dimension (the rows of one Linear).
        self.heads = nn.Linear(feat, len(c.dims))

    # --------------------------------------------------------------------------------- interface attributes
    @property
    def dims(self) -> tuple[str, ...]:
        return self.config.dims

    @property
    def dimensions(self) -> tuple[str, ...]:
        return self.config.dims

    @property
    def latent_space(self) -> str:
        return self.config.latent_space

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.config.latent_shape

    @property
    def conditioning(self) -> str:
        if self.config.trunk == "transformer":
            return "cond"
        return "cond" if self.config.cond_dim else "none"

    # --------------------------------------------------------------------------------- forward
    def _cond_vector(self, cond, batch: int, device, dtype) -> torch.Tensor | None:
        if not self.config.cond_dim:
            return None
        if cond is None or self.config.cond_key not in cond:
            raise GuidanceError(f"this latent reward model is conditioned on cond[{self.config.cond_key!r}]")
        v = cond[self.config.cond_key].to(device, dtype)
        if v.ndim == 3:  # token embeddings: mean over tokens
            v = v.mean(1)
        return v.expand(batch, -1) if v.shape[0] == 1 else v

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor]:
        b = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device, dtype=x_t.dtype).reshape(-1).expand(b)
        c = self.config
        if c.trunk == "transformer":
            h = self._trunk_features(x_t, t, cond)
            h = self.pre_head(h)
        else:
            dtype = self.heads.weight.dtype
            emb = self.time_mlp(timestep_embedding(t, c.time_dim).to(dtype))
            cv = self._cond_vector(cond, b, x_t.device, dtype)
            if cv is not None:
                emb = emb + self.cond_proj(cv)
            x = x_t.to(dtype)
            if c.trunk == "conv":
                h = self.stem(x)
                for blk in self.blocks:
                    h = blk(h, emb)
                h = nn.functional.silu(self.out_norm(h)).flatten(2).mean(-1)
            else:
                h = self.mlp(torch.cat([x.flatten(1), emb], dim=1))
        scores = self.heads(h)
        return {d: scores[:, i] for i, d in enumerate(c.dims)}

    def _trunk_features(self, x_t, t, cond) -> torch.Tensor:
        c = self.config
        kind = c.transformer_class
        dtype = next(self.trunk.parameters()).dtype
        x = x_t.to(dtype)
        try:
            if kind == "FluxTransformer2DModel":
                from ..models.flux import FluxAdapter

                h, w = x.shape[-2:]
                embeds = cond["prompt_embeds"].to(dtype)
                guidance = None
                if self.trunk.config.guidance_embeds:
                    guidance = cond.get("guidance")
                    guidance = (torch.full((x.shape[0],), c.guidance, device=x.device) if guidance is None
                                else guidance).to(x.device, torch.float32)
                self.trunk(hidden_states=FluxAdapter.pack(x), timestep=t.to(dtype), guidance=guidance,
                           pooled_projections=cond["pooled_prompt_embeds"].to(dtype), encoder_hidden_states=embeds,
                           txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device, dtype=dtype),
                           img_ids=FluxAdapter.image_ids(h, w, device=x.device, dtype=dtype), return_dict=False)
            elif kind == "SD3Transformer2DModel":
                self.trunk(hidden_states=x, timestep=t.to(dtype) * c.num_train_timesteps,
                           encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                           pooled_projections=cond["pooled_prompt_embeds"].to(dtype), return_dict=False)
            else:  # WanTransformer3DModel
                self.trunk(hidden_states=x, timestep=t.to(dtype) * c.num_train_timesteps,
                           encoder_hidden_states=cond["prompt_embeds"].to(dtype), return_dict=False)
        except _FeaturesReady as ready:
            return ready.features.float().mean(1).to(self.heads.weight.dtype)
        raise RuntimeError("the transformer trunk never reached norm_out")  # pragma: no cover

    # --------------------------------------------------------------------------------- constructors
    @classmethod
    def from_transformer(cls, transformer: nn.Module, num_blocks: int, *, dims: Sequence[str] = ("VQ", "MQ", "TA"),
                         latent_space: str, latent_shape: Sequence[int], hidden: int = 256,
                         num_train_timesteps: int = 1000) -> LatentRewardModel:
        """A reward whose trunk is the first `num_blocks` blocks of a flow transformer (weights copied)."""
        name = type(transformer).__name__
        if name not in _TRUNK_CLASSES:
            raise GuidanceError(f"a transformer trunk needs one of {sorted(_TRUNK_CLASSES)}, got {name}")
        n_avail = len(getattr(transformer, _TRUNK_CLASSES[name]))
        if not 1 <= num_blocks <= n_avail:
            raise GuidanceError(f"num_blocks must be in 1..{n_avail} for this {name}, got {num_blocks}")
        config = LatentRewardConfig(dims=tuple(dims), latent_space=latent_space, latent_shape=tuple(latent_shape),
                                    trunk="transformer", hidden=hidden, transformer_class=name,
                                    transformer_config=_plain_config(transformer.config), num_blocks=num_blocks,
                                    num_train_timesteps=num_train_timesteps)
        model = cls(config)
        # A peft-wrapped transformer: its base weights are `*.base_layer.*`; LoRA weights are not copied.
        source = {k.replace(".base_layer", ""): v for k, v in transformer.state_dict().items() if "lora_" not in k}
        target = model.trunk.state_dict()
        missing = [k for k in target if k not in source or source[k].shape != target[k].shape]
        if missing:
            raise GuidanceError(f"cannot copy the first {num_blocks} blocks of {name}: {missing[:3]} ...")
        model.trunk.load_state_dict({k: source[k] for k in target})
        return model.to(next(transformer.parameters()).dtype)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        share_like_umask(directory / WEIGHTS_NAME)  # safetensors writes 0600 files (genalign.files)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config.to_json(), indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, latent_space: str | None = None,
                        latent_shape: Sequence[int] | None = None, device=None, dtype=None) -> LatentRewardModel:
        """Load; with latent_space / latent_shape given, refuse a model made for other latents (before building)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg_path = directory / CONFIG_NAME
        if not cfg_path.is_file():
            raise LatentRewardLoadError(f"{str(directory)!r} holds no {CONFIG_NAME}: not a genalign latent reward "
                                        "model")
        raw = json.loads(cfg_path.read_text())
        if raw.get("kind") != "latent_reward":
            raise LatentRewardLoadError(f"{str(cfg_path)!r} is not a latent reward config (kind={raw.get('kind')!r})")
        config = LatentRewardConfig.from_json(raw)
        if latent_space is not None or latent_shape is not None:
            stub = _Declared(config)
            try:
                check_compatible(stub, latent_space or config.latent_space,
                                 latent_shape if latent_shape is not None else config.latent_shape)
            except GuidanceError as e:
                raise LatentRewardLoadError(f"{str(directory)!r}: {e}") from None
        model = cls(config)
        model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        model.eval()
        return model.to(device=device, dtype=dtype) if (device or dtype) else model


@dataclass
class _Declared:
    config: LatentRewardConfig

    @property
    def dims(self):
        return self.config.dims

    @property
    def latent_space(self):
        return self.config.latent_space

    @property
    def latent_shape(self):
        return self.config.latent_shape


# ------------------------------------------------------------------------------------------- transformer trunks
_TRUNK_CLASSES = {
    "SD3Transformer2DModel": "transformer_blocks",
    "FluxTransformer2DModel": "transformer_blocks",
    "WanTransformer3DModel": "blocks",
}


def _plain_config(config) -> dict:
    out = {}
    for k, v in dict(config).items():
        if k.startswith("_"):
            continue
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


def _build_trunk(class_name: str, config: dict, k: int) -> nn.Module:
    """The transformer class with its block list cut to the first k blocks (same parameter names as the full
    model's first k blocks). SD3 makes its LAST block context-pre-only, so it is built with k + 1 and cut."""
    import diffusers

    if class_name not in _TRUNK_CLASSES:
        raise GuidanceError(f"unsupported transformer trunk {class_name!r}")
    cls = getattr(diffusers, class_name)
    cfg = dict(config)
    if class_name == "SD3Transformer2DModel":
        cfg["num_layers"] = k + 1
    elif class_name == "FluxTransformer2DModel":
        cfg["num_layers"], cfg["num_single_layers"] = k, 0
    else:
        cfg["num_layers"] = k
    model = cls.from_config(cfg)
    attr = _TRUNK_CLASSES[class_name]
    setattr(model, attr, nn.ModuleList(list(getattr(model, attr))[:k]))
    return model.eval()


def _trunk_width(trunk: nn.Module) -> int:
    cfg = trunk.config
    return int(cfg.num_attention_heads * cfg.attention_head_dim)


# ------------------------------------------------------------------------------------------- training hook
def _cat_cond(cond, n: int = 2):
    if cond is None:
        return None
    if isinstance(cond, Mapping):
        return {k: torch.cat([v] * n) for k, v in cond.items()}
    return list(cond) * n


def pair_loss(model, x0_a: torch.Tensor, x0_b: torch.Tensor, label, cond: Any = None, *, loss: str = "btt",
              theta: float = 5.0, t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
              timestep_sampler: str = "logit_normal", generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Tie-aware preference loss of a noise-aware latent reward on one batch of pairs.

    x0_a, x0_b: clean normalised latents of the two items of each pair (B, ...). Both are noised with the SAME
    t (logit-normal by default) and the SAME noise, then scored in one batched call. label: 1 = A wins, 0 = B
    wins, 0.5 = tie (NaN = no label), shape (B,), (B, D), or a dict dim -> (B,). loss: "btt" (Rao-Kupper ties,
    theta) or "bt". Returns (loss, stats) like `genalign.losses.reward`; stats also hold "t"."""
    from ..losses.reward import bt_loss, btt_loss

    b = x0_a.shape[0]
    if x0_b.shape != x0_a.shape:
        raise ValueError(f"pair latents differ in shape: {tuple(x0_a.shape)} vs {tuple(x0_b.shape)}")
    if t is None:
        t = flow.sample_timesteps(b, timestep_sampler, generator=generator).to(x0_a.device)
    if noise is None:
        noise = torch.randn(x0_a.shape, generator=generator).to(x0_a)
    x_t = torch.cat([flow.interpolate(x0_a, noise, t), flow.interpolate(x0_b, noise, t)])
    scores = model(x_t, torch.cat([t, t]), _cat_cond(cond))
    dims = reward_dims(model)
    s = torch.stack([scores[d] for d in dims], dim=1)
    ra, rb = s[:b], s[b:]
    if isinstance(label, Mapping):
        label = torch.stack([torch.as_tensor(label[d], dtype=torch.float32) for d in dims], dim=1)
    if loss == "btt":
        value, stats = btt_loss(ra, rb, label, theta=theta)
    elif loss == "bt":
        value, stats = bt_loss(ra, rb, label)
    else:
        raise ValueError(f"loss must be 'btt' or 'bt', got {loss!r}")
    stats["t"] = t.detach()
    return value, stats
