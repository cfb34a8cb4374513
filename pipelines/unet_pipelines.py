"""RLG pipelines for UNet (epsilon / v-prediction) models: Stable Diffusion 1.x / 2.x and SDXL.

RLG combines the model outputs in the model's own parameterisation (epsilon, v or x0): the combination is affine
with weights summing to 1, so it is the same rule as in velocity terms (ALGORITHMS.md 4). The stock scheduler
(PNDM, DDIM, Euler, DPM-Solver, ...) runs unchanged. Flow-NRG is for flow models and is refused here.
"""

from __future__ import annotations

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from genalign.models.unet import UNetAdapter

from .guided import GuidedPipelineMixin


class RLGStableDiffusionPipeline(GuidedPipelineMixin, StableDiffusionPipeline):
    """StableDiffusionPipeline with RLG (`rlg_scale`, `rlg_experts`, `rlg_window`)."""

    _genalign_adapter_cls = UNetAdapter
    _stock_class = StableDiffusionPipeline
    _nrg_supported = False
    _guidance_modules = ("unet",)
    _callback_tensor_inputs = [*StableDiffusionPipeline._callback_tensor_inputs, "noise_pred"]  # noqa: RUF012 - a list, as diffusers


class RLGStableDiffusionXLPipeline(GuidedPipelineMixin, StableDiffusionXLPipeline):
    """StableDiffusionXLPipeline with RLG (`rlg_scale`, `rlg_experts`, `rlg_window`)."""

    _genalign_adapter_cls = UNetAdapter
    _stock_class = StableDiffusionXLPipeline
    _nrg_supported = False
    _guidance_modules = ("unet",)
    _callback_tensor_inputs = [*StableDiffusionXLPipeline._callback_tensor_inputs, "noise_pred"]  # noqa: RUF012 - a list, as diffusers
