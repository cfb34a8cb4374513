"""Wan 2.1 / 2.2 text-to-video (WanTransformer3DModel): flow matching over video latents (B, C, F, H, W).

Latents are normalised per channel with the VAE config's `latents_mean` / `latents_std`, as WanPipeline does:
normalised = (raw - mean) / std. Wan 2.2's two-expert layout (`transformer` at t >= `boundary_ratio`,
`transformer_2` below) is followed in `velocity`; LoRA attaches to `transformer` only. Wan 2.2 TI2V's
`expand_timesteps` feeds one timestep per token, all equal for text-to-video: a per-sample timestep gives the same
output (tested), so it needs nothing here. The low-noise expert's separate `guidance_scale_2` is not modelled.
"""

from __future__ import annotations

import torch

from .base import Cond, FlowAdapter


class WanAdapter(FlowAdapter):
    family = "wan"
    pipeline_class_names = ("WanPipeline",)
    is_video = True

    def __init__(self, pipe, device=None, max_sequence_length: int = 512):
        super().__init__(pipe, device=device)
        if getattr(pipe, "transformer_2", None) is not None:
            pipe.transformer_2.eval()
        self.max_sequence_length = max_sequence_length

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer if self.pipe.transformer is not None else self.pipe.transformer_2

    @torch.no_grad()
    def _encode_prompt(self, prompts: list[str]) -> Cond:
        embeds, _ = self.pipe.encode_prompt(
            prompt=list(prompts),
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
            device=self.device,
        )
        return {"prompt_embeds": embeds.to(self.dtype)}

    @staticmethod
    def _forward(model, x_t: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        return model(hidden_states=x_t, timestep=timestep, encoder_hidden_states=embeds, return_dict=False)[0]

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_t.device, dtype=x_t.dtype).expand(x_t.shape[0])
        num_train = self.pipe.scheduler.config.num_train_timesteps
        timestep = t * num_train
        embeds = cond["prompt_embeds"]
        boundary = self.pipe.config.get("boundary_ratio")
        if boundary is None or self.pipe.transformer_2 is None or self.pipe.transformer is None:
            return self._forward(self.denoiser, x_t, timestep, embeds)
        # Wan 2.2 A14B: `transformer` at high noise (t >= boundary), `transformer_2` below it.
        high = timestep >= boundary * num_train
        out = torch.empty_like(x_t)
        for model, mask in ((self.pipe.transformer, high), (self.pipe.transformer_2, ~high)):
            if mask.any():
                out[mask] = self._forward(model, x_t[mask], timestep[mask], embeds[mask])
        return out

    def latent_shape(self, height: int, width: int, num_frames: int | None = None) -> tuple[int, ...]:
        """num_frames pixel frames -> (num_frames - 1) // temporal factor + 1 latent frames (1 when None)."""
        cfg = self.pipe.vae.config
        ft, fs = self.pipe.vae_scale_factor_temporal, self.pipe.vae_scale_factor_spatial
        frames = (num_frames - 1) // ft + 1 if num_frames else 1
        return (cfg.z_dim, frames, height // fs, width // fs)

    def latent_normalisation(self, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """WanPipeline's per-channel (mean, 1 / std); the VAE's scaling_factor, if any, is not used."""
        cfg = self.pipe.vae.config
        view = (1, -1, *([1] * (ndim - 2)))
        return torch.tensor(cfg.latents_mean).view(view), 1.0 / torch.tensor(cfg.latents_std).view(view)
