"""Stable Diffusion 3 / 3.5 (SD3Transformer2DModel, MMDiT): a velocity model in the flow convention already."""

from __future__ import annotations

import torch

from .base import Cond, FlowAdapter


class SD3Adapter(FlowAdapter):
    family = "sd3"
    pipeline_class_names = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")

    def __init__(self, pipe, device=None, max_sequence_length: int | None = None):
        super().__init__(pipe, device=device)
        # Without T5 the pipeline feeds zeros for the T5 tokens; a model trained with one such token (the world's)
        # must be sampled with one, so the default follows the pipeline's components.
        self.max_sequence_length = max_sequence_length or (256 if pipe.text_encoder_3 is not None else 1)

    @torch.no_grad()
    def _encode_prompt(self, prompts: list[str]) -> Cond:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
            device=self.device,
        )
        return {"prompt_embeds": embeds.to(self.dtype), "pooled_prompt_embeds": pooled.to(self.dtype)}

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_t.device, dtype=x_t.dtype).expand(x_t.shape[0])
        num_train = self.pipe.scheduler.config.num_train_timesteps
        return self.denoiser(
            hidden_states=x_t,
            timestep=t * num_train,
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"],
            return_dict=False,
        )[0]

    def set_schedule(self, scheduler, num_steps: int, latents: torch.Tensor) -> None:
        """As StableDiffusion3Pipeline: a resolution-dependent shift `mu` when the scheduler asks for one."""
        if not scheduler.config.get("use_dynamic_shifting", False):
            return super().set_schedule(scheduler, num_steps, latents)
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        p = self.denoiser.config.patch_size
        cfg = scheduler.config
        mu = calculate_shift(
            (latents.shape[-2] // p) * (latents.shape[-1] // p),
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.16),
        )
        scheduler.set_timesteps(num_steps, device=latents.device, mu=mu)
