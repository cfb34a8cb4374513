"""FLUX.1 (FluxTransformer2DModel): a flow-matching transformer over 2x2-packed latents.

The adapter speaks unpacked latents (B, C, H, W) in the normalised latent space like every other adapter, and
packs them into FLUX's token sequence (B, H/2 * W/2, 4C) with its position ids inside `velocity`. FluxPipeline's
`latents` argument and its `output_type="latent"` result are in the packed layout: convert with `pack`/`unpack`.

Guidance-distilled checkpoints (FLUX.1-dev, `guidance_embeds=True`) take the distilled guidance strength as an
input: it travels in the conditioning as `cond["guidance"]` (shape (B,)), set from the adapter's `guidance`
(FluxPipeline's `guidance_scale`, default 3.5). Classifier-free guidance through `genalign.sampling` is the
pipeline's `true_cfg_scale` (with a negative prompt); for a distilled model sample with guidance_scale=1.
"""

from __future__ import annotations

import torch

from .base import Cond, FlowAdapter


class FluxAdapter(FlowAdapter):
    family = "flux"
    pipeline_class_names = ("FluxPipeline", "FluxImg2ImgPipeline")

    def __init__(self, pipe, device=None, max_sequence_length: int = 512, guidance: float = 3.5):
        super().__init__(pipe, device=device)
        self.max_sequence_length = max_sequence_length
        self.guidance = guidance

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.denoiser.config.guidance_embeds)

    # ----------------------------------------------------------------------------- packing
    @staticmethod
    def pack(latents: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/2 * W/2, 4C), FluxPipeline._pack_latents' layout."""
        b, c, h, w = latents.shape
        x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def unpack(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, H/2 * W/2, 4C) -> (B, C, H, W) for latent height H and width W (inverse of `pack`)."""
        b, _, c4 = packed.shape
        x = packed.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c4 // 4, height, width)

    @staticmethod
    def image_ids(height: int, width: int, device=None, dtype=None) -> torch.Tensor:
        """Position ids (H/2 * W/2, 3) of the packed tokens: (0, row, column)."""
        rows = torch.arange(height // 2, device=device).repeat_interleave(width // 2)
        cols = torch.arange(width // 2, device=device).repeat(height // 2)
        return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).to(dtype)

    # ----------------------------------------------------------------------------- the interface
    @torch.no_grad()
    def _encode_prompt(self, prompts: list[str]) -> Cond:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        cond = {"prompt_embeds": embeds.to(self.dtype), "pooled_prompt_embeds": pooled.to(self.dtype)}
        if self.guidance_embeds:
            cond["guidance"] = torch.full((len(prompts),), float(self.guidance), device=self.device)
        return cond

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        b, _, h, w = x_t.shape
        t = torch.as_tensor(t, device=x_t.device, dtype=x_t.dtype).expand(b)
        guidance = None
        if self.guidance_embeds:
            guidance = cond.get("guidance")
            if guidance is None:
                guidance = torch.full((b,), float(self.guidance), device=x_t.device)
            guidance = guidance.to(x_t.device, torch.float32).expand(b)
        embeds = cond["prompt_embeds"]
        out = self.denoiser(
            hidden_states=self.pack(x_t),
            timestep=t,  # FLUX scales t (and guidance) by 1000 itself
            guidance=guidance,
            pooled_projections=cond["pooled_prompt_embeds"],
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=x_t.device, dtype=embeds.dtype),
            img_ids=self.image_ids(h, w, device=x_t.device, dtype=embeds.dtype),
            return_dict=False,
        )[0]
        return self.unpack(out, h, w)

    def latent_shape(self, height: int, width: int, num_frames: int | None = None) -> tuple[int, ...]:
        f = self.pipe.vae_scale_factor * 2  # packing needs an even latent size
        return (self.denoiser.config.in_channels // 4, 2 * (height // f), 2 * (width // f))

    def set_schedule(self, scheduler, num_steps: int, latents: torch.Tensor) -> None:
        """FluxPipeline's schedule: sigmas linspace(1, 1/N, N), shifted by mu = calculate_shift(packed length)."""
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = scheduler.config
        sigmas = None if cfg.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
        mu = calculate_shift(
            (latents.shape[-2] // 2) * (latents.shape[-1] // 2),
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        if sigmas is None:
            scheduler.set_timesteps(num_steps, device=latents.device, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=latents.device, mu=mu)
