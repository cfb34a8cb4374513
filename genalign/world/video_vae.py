"""The world video model's autoencoder: the world's image AutoencoderKL applied frame by frame.

A tiny AutoencoderKLWan collapsed to blank frames when trained on CPU (WORLD.md), so the world's video latent
space is the image latent space of each frame, with no temporal compression. This class gives it the
interface WanPipeline expects of its VAE (5-D tensors, `z_dim`, per-channel `latents_mean` / `latents_std`,
`scale_factor_temporal` / `scale_factor_spatial`), so the video model is an ordinary diffusers pipeline folder.
diffusers records this class in model_index.json as ["genalign.world.video_vae", "FramewiseAutoencoderKL"] and,
when loading, looks for its loadable base classes (ModelMixin) in this module's namespace: hence the import.
Note for the stock WanPipeline: it rounds `num_frames` to `k * scale_factor_temporal + 1`, which with a temporal
factor of 1 adds one frame; genalign's own sampler and pipelines take `num_frames` literally.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    ModelMixin,  # noqa: F401  (see below)
)
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput


class FramewiseAutoencoderKL(AutoencoderKL):
    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels: tuple[int, ...] = (16, 32),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 8,
        sample_size: int = 32,
        scaling_factor: float = 1.0,
        shift_factor: float | None = None,
        latents_mean: tuple[float, ...] | None = None,
        latents_std: tuple[float, ...] | None = None,
        force_upcast: bool = False,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
        z_dim: int = 4,
        scale_factor_temporal: int = 1,
        scale_factor_spatial: int = 2,
    ):
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            down_block_types=down_block_types,
            up_block_types=up_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            act_fn=act_fn,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            sample_size=sample_size,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            latents_mean=latents_mean,
            latents_std=latents_std,
            force_upcast=force_upcast,
            use_quant_conv=use_quant_conv,
            use_post_quant_conv=use_post_quant_conv,
            mid_block_add_attention=mid_block_add_attention,
        )

    @staticmethod
    def _fold(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        b, c, f, h, w = x.shape
        return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w), f

    @staticmethod
    def _unfold(x: torch.Tensor, frames: int) -> torch.Tensor:
        bf, c, h, w = x.shape
        return x.reshape(bf // frames, frames, c, h, w).permute(0, 2, 1, 3, 4)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        if x.ndim == 4:
            return super().encode(x, return_dict=return_dict)
        flat, frames = self._fold(x)
        posterior = super().encode(flat).latent_dist
        # Re-wrap the per-frame posterior parameters as one 5-D Gaussian.
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        from diffusers.models.modeling_outputs import AutoencoderKLOutput

        params = self._unfold(posterior.parameters, frames)
        dist = DiagonalGaussianDistribution(params)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        if z.ndim == 4:
            return super().decode(z, return_dict=return_dict)
        flat, frames = self._fold(z)
        out = self._unfold(super().decode(flat).sample, frames)
        return DecoderOutput(sample=out) if return_dict else (out,)

    @classmethod
    def from_image_vae(cls, vae: AutoencoderKL, latents_mean, latents_std) -> FramewiseAutoencoderKL:
        cfg = {k: v for k, v in vae.config.items() if not k.startswith("_") and k in cls.__init__.__code__.co_varnames}
        cfg.update(latents_mean=list(latents_mean), latents_std=list(latents_std), z_dim=vae.config.latent_channels)
        out = cls(**cfg)
        out.load_state_dict(vae.state_dict())
        return out.eval()
