"""Euler sampling of any adapter with classifier-free guidance, on the adapter's own scheduler.

The loop is the stock diffusers flow-matching loop written over `adapter.velocity`, so it reproduces the stock
pipeline's output for the same initial noise (tested), and the combiner is a plain function any guidance rule
(CFG, RLG, NRG) can replace.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from . import flow
from .models.base import Cond, FlowAdapter

Combiner = Callable[[torch.Tensor, torch.Tensor, Cond, Cond], torch.Tensor]


def cfg_velocity(adapter: FlowAdapter, x: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond, scale: float):
    """v_uncond + g (v_cond - v_uncond), with both halves in one batched forward."""
    if scale == 1.0:
        return adapter.velocity(x, t, cond)
    both = adapter.velocity(torch.cat([x, x]), torch.cat([t, t]), FlowAdapter.cat_cond([uncond, cond]))
    v_u, v_c = both.chunk(2)
    return v_u + scale * (v_c - v_u)


def initial_noise(adapter: FlowAdapter, n: int, height: int, width: int, num_frames: int | None, generator):
    shape = (n, *adapter.latent_shape(height, width, num_frames))
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(adapter.device, adapter.dtype)


@torch.no_grad()
def sample_latents(
    adapter: FlowAdapter,
    prompts: list[str],
    *,
    num_steps: int = 20,
    guidance_scale: float = 4.0,
    height: int = 32,
    width: int = 32,
    num_frames: int | None = None,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    negative_prompt: str = "",
    combiner: Combiner | None = None,
    progress: bool = False,
    init_latents: torch.Tensor | None = None,
    strength: float = 1.0,
) -> torch.Tensor:
    """Integrate from noise (t=1) to data (t=0). Returns normalised latents.

    `latents`: the initial unit Gaussian noise (B, *adapter.latent_shape(...)), as the stock pipelines'
    `latents` argument (unpacked for FLUX). Like them, it is multiplied by the scheduler's `init_noise_sigma`
    (1 for flow models; for UNet models the factor that takes it to the flow sample at the first noise level).
    `init_latents` (normalised, e.g. `adapter.encode_pixels(images)`) with `strength` in (0, 1]: SDEdit /
    image-to-image as the stock img2img pipelines do it: the last num_steps * strength steps only, from
    the flow sample (1 - t) init + t noise at the first of them.
    """
    cond = adapter.encode_prompt(prompts)
    uncond = adapter.encode_prompt([negative_prompt] * len(prompts))
    x = latents if latents is not None else initial_noise(adapter, len(prompts), height, width, num_frames, generator)
    scheduler = adapter.sampling_scheduler()
    adapter.set_schedule(scheduler, num_steps, x)
    num_train = scheduler.config.num_train_timesteps
    timesteps = scheduler.timesteps
    if init_latents is None:
        x = x * getattr(scheduler, "init_noise_sigma", 1.0)
    else:
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if init_latents.shape != x.shape:
            raise ValueError(f"init_latents has shape {tuple(init_latents.shape)}, the noise {tuple(x.shape)}")
        skip = int(max(num_steps - num_steps * strength, 0))  # the stock img2img pipelines' rounding: >= 1 step
        timesteps = timesteps[skip:]
        scheduler.set_begin_index(skip)
        x = flow.interpolate(init_latents.to(x.device, x.dtype), x, (timesteps[0] / num_train).to(x.dtype))
    for ts in tqdm(timesteps, disable=not progress, desc="sampling", leave=False):
        t = (ts / num_train).to(x.device, x.dtype).expand(x.shape[0])
        if combiner is None:
            v = cfg_velocity(adapter, x, t, cond, uncond, guidance_scale)
        else:
            v = combiner(x, t, cond, uncond)
        x = scheduler.step(v, ts, x, return_dict=False)[0]
    return x


@torch.no_grad()
def latents_to_uint8(adapter: FlowAdapter, latents: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Decode to uint8 arrays: images (N, H, W, 3) or videos (N, F, H, W, 3)."""
    outs = []
    for chunk in latents.split(batch_size):
        px = adapter.decode_latents(chunk).float().clamp(-1, 1)
        px = ((px + 1) * 127.5).round().to(torch.uint8).cpu()
        # (N, C, H, W) -> (N, H, W, C); videos (N, C, F, H, W) -> (N, F, H, W, C)
        outs.append(px.permute(0, 2, 3, 1).numpy() if px.ndim == 4 else px.permute(0, 2, 3, 4, 1).numpy())
    return np.concatenate(outs)
