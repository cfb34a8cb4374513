"""UNet2DConditionModel pipelines (SD1.5 / SD2 / SDXL): DDPM epsilon- or v-prediction models as velocity models.

A DDPM sample x_s = sqrt(a) x0 + sqrt(1 - a) eps at the table's noise level a = alphas_cumprod[s] is the flow
sample x_t at t = sqrt(1 - a) / (sqrt(a) + sqrt(1 - a)) scaled by ddpm_input_scale(t) (genalign.flow). So
`velocity(x_t, t)` scales x_t, evaluates the UNet at the (fractional) DDPM timestep with the same noise level and
converts its epsilon / v output into v = eps - x0. The latent space (VAE latents * scaling_factor) is the
pipeline's own; only the noisy-sample scale and the time variable change.

Sampling: `sampling_scheduler()` is a flow-matching Euler scheduler whose times are the pipeline scheduler's own
noise levels mapped to flow t. Euler in flow time is the same first-order step as Euler in sigma (k-diffusion,
EulerDiscreteScheduler) and as DDIM (eta = 0), so with those schedulers genalign's sampler follows the stock
pipeline's trajectory (tested against StableDiffusionPipeline + EulerDiscreteScheduler); with multistep or
stochastic schedulers (DPM-Solver, UniPC, ancestral) it visits the same noise levels with plain Euler steps.
Fractional DDPM timesteps are found by interpolating log-SNR in the table, as EulerDiscreteScheduler does for
Karras sigmas; its "linspace" spacing interpolates sigma linearly instead, so there the timesteps differ slightly.
"""

from __future__ import annotations

import copy

import torch

from .. import flow
from .base import Cond, FlowAdapter


class UNetAdapter(FlowAdapter):
    family = "unet"
    pipeline_class_names = (
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
    )
    lora_save_kwarg = "unet_lora_layers"

    def __init__(self, pipe, device=None):
        super().__init__(pipe, device=device)
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
        self.alphas_cumprod = torch.as_tensor(pipe.scheduler.alphas_cumprod, dtype=torch.float64)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet

    @property
    def is_sdxl(self) -> bool:
        return self.denoiser.config.get("addition_embed_type") == "text_time"

    # ----------------------------------------------------------------------------- the interface
    @torch.no_grad()
    def _encode_prompt(self, prompts: list[str]) -> Cond:
        """SD: {"prompt_embeds"}; SDXL also {"text_embeds"} (pooled). SDXL's size/crop micro-conditioning
        `add_time_ids` (B, 6) may be added to the dict; when absent `velocity` uses the stock default for the
        latents' size (original = target = image size, crop (0, 0)).

        SDXL pipelines with `force_zeros_for_empty_prompt` (the default) use all-zero embeddings as the
        unconditional input; so does this adapter for the empty prompt "", so that sampling with
        negative_prompt="" is the stock pipeline's default (negative_prompt=None)."""
        if self.is_sdxl:
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=list(prompts), device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            if self.pipe.config.get("force_zeros_for_empty_prompt", False):
                empty = torch.tensor([p == "" for p in prompts], device=embeds.device)
                embeds = embeds.masked_fill(empty.view(-1, 1, 1), 0.0)
                pooled = pooled.masked_fill(empty.view(-1, 1), 0.0)
            return {"prompt_embeds": embeds.to(self.dtype), "text_embeds": pooled.to(self.dtype)}
        embeds, _ = self.pipe.encode_prompt(list(prompts), self.device, 1, False)
        return {"prompt_embeds": embeds.to(self.dtype)}

    def ddpm_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The fractional DDPM timestep with the same noise level as flow time t (float64 for accuracy)."""
        a = flow.alpha_bar_from_flow_t(t.double())
        return flow.timestep_from_alpha_bar(a, self.alphas_cumprod.to(t.device))

    def default_time_ids(self, x_t: torch.Tensor) -> torch.Tensor:
        f = self.pipe.vae_scale_factor
        h, w = x_t.shape[-2] * f, x_t.shape[-1] * f
        return torch.tensor([[h, w, 0, 0, h, w]], device=x_t.device, dtype=x_t.dtype).expand(x_t.shape[0], -1)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
        scale = flow.ddpm_input_scale(t.double()).to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
        added = None
        if self.is_sdxl:
            time_ids = cond.get("add_time_ids")
            added = {
                "text_embeds": cond["text_embeds"],
                "time_ids": self.default_time_ids(x_t) if time_ids is None else time_ids,
            }
        out = self.denoiser(
            x_t * scale,
            self.ddpm_timestep(t).to(torch.float32),
            encoder_hidden_states=cond["prompt_embeds"],
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        t = t.to(x_t.dtype)
        if self.prediction_type == "sample":
            return flow.velocity_from_x0(x_t, out, t)
        return flow.velocity_from_ddpm_output(x_t, out, t, self.prediction_type)

    # ----------------------------------------------------------------------------- sampling
    def sampling_scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.pipe.scheduler.config.num_train_timesteps)

    def stock_flow_times(self, num_steps: int) -> tuple[torch.Tensor, float]:
        """The pipeline scheduler's noise levels for num_steps as flow times (float64, ending at 0), and the
        factor from unit noise to the flow sample at the first time (the stock `latents * init_noise_sigma`)."""
        stock = copy.deepcopy(self.pipe.scheduler)
        stock.set_timesteps(num_steps, device="cpu")
        sigmas = getattr(stock, "sigmas", None)
        if sigmas is not None and len(sigmas) == len(stock.timesteps) + 1:  # Euler, Heun, LMS, DPM-Solver, ...
            sigma = torch.as_tensor(sigmas, dtype=torch.float64)
            times = sigma / (1 + sigma)
        else:  # DDIM, PNDM, DDPM: the table's alpha_bar at each timestep
            a = self.alphas_cumprod[torch.as_tensor(stock.timesteps).long()]
            times = torch.cat([flow.flow_t_from_alpha_bar(a), torch.zeros(1, dtype=torch.float64)])
        sigma0 = float(times[0] / (1 - times[0]))
        init = float(stock.init_noise_sigma)
        # init_noise_sigma == 1: the sampler works on DDPM samples x_s (noise as is); otherwise on x0 + sigma eps.
        x_at_first = (1 + sigma0**2) ** 0.5 if init == 1.0 else init
        return times, x_at_first / (1 + sigma0)

    def set_schedule(self, scheduler, num_steps: int, latents: torch.Tensor) -> None:
        """Flow times of the stock schedule on the flow-matching scheduler from `sampling_scheduler()`; its
        `init_noise_sigma` is set so that noise * init_noise_sigma is the stock pipeline's starting point."""
        times, noise_scale = self.stock_flow_times(num_steps)
        scheduler.set_timesteps(sigmas=times[:-1].tolist(), device=latents.device)
        scheduler.init_noise_sigma = noise_scale
