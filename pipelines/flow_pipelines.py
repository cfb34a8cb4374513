"""RLG + Flow-NRG pipelines for the flow-matching families: SD3 / SD3.5, FLUX.1 and Wan 2.1 / 2.2.

    from genalign.pipelines import RLGStableDiffusion3Pipeline
    pipe = RLGStableDiffusion3Pipeline.from_pretrained("stabilityai/stable-diffusion-3.5-medium")
    pipe.load_lora_weights("out/checkpoint-1000", adapter_name="dpo")
    image = pipe("a red circle", guidance_scale=4.5, rlg_scale=1.6).images[0]
    image = pipe("a red circle", rlg_experts={"dpo": 1.2, "aesthetic": 0.5}, rlg_window=(0.2, 1.0)).images[0]
    video = wan("a cat", nrg_reward_model=reward, nrg_weights={"VQ": 0.5, "MQ": 0.5, "TA": 0}, nrg_scale=2).frames

See `genalign.pipelines.guided` for the arguments and how they combine with the stock loop.
"""

from __future__ import annotations

import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, WanPipeline

from genalign.models.flux import FluxAdapter
from genalign.models.sd3 import SD3Adapter
from genalign.models.wan import WanAdapter

from .guided import GuidedPipelineMixin


class RLGStableDiffusion3Pipeline(GuidedPipelineMixin, StableDiffusion3Pipeline):
    """StableDiffusion3Pipeline with RLG (`rlg_scale`, `rlg_experts`, `rlg_window`) and Flow-NRG (`nrg_*`)."""

    _genalign_adapter_cls = SD3Adapter
    _stock_class = StableDiffusion3Pipeline
    _callback_tensor_inputs = [*StableDiffusion3Pipeline._callback_tensor_inputs, "noise_pred"]  # noqa: RUF012 - a list, as diffusers

    def _encode_for_reward(self, p):
        embeds, _, pooled, _ = self.encode_prompt(
            prompt=p["prompt"], prompt_2=p["prompt_2"], prompt_3=p["prompt_3"], do_classifier_free_guidance=False,
            prompt_embeds=p["prompt_embeds"], pooled_prompt_embeds=p["pooled_prompt_embeds"],
            device=self._execution_device, clip_skip=p["clip_skip"], num_images_per_prompt=p["num_images_per_prompt"],
            max_sequence_length=p["max_sequence_length"],
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


class RLGFluxPipeline(GuidedPipelineMixin, FluxPipeline):
    """FluxPipeline with RLG and Flow-NRG. CFG here is the stock `true_cfg_scale` (with a negative prompt);
    RLG also works without it (guidance-distilled FLUX.1-dev: one call per step, combined per call)."""

    _genalign_adapter_cls = FluxAdapter
    _stock_class = FluxPipeline
    _callback_tensor_inputs = [*FluxPipeline._callback_tensor_inputs, "noise_pred"]  # noqa: RUF012 - a list, as diffusers

    def _encode_for_reward(self, p):
        embeds, pooled, _ = self.encode_prompt(
            prompt=p["prompt"], prompt_2=p["prompt_2"], prompt_embeds=p["prompt_embeds"],
            pooled_prompt_embeds=p["pooled_prompt_embeds"], device=self._execution_device,
            num_images_per_prompt=p["num_images_per_prompt"], max_sequence_length=p["max_sequence_length"],
        )
        cond = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if self.transformer.config.guidance_embeds:
            cond["guidance"] = torch.full((embeds.shape[0],), float(p["guidance_scale"]), device=embeds.device)
        return cond


class RLGWanPipeline(GuidedPipelineMixin, WanPipeline):
    """WanPipeline (2.1, and 2.2 with two experts: both transformers are guided) with RLG and Flow-NRG."""

    _genalign_adapter_cls = WanAdapter
    _stock_class = WanPipeline
    _guidance_modules = ("transformer", "transformer_2")
    _callback_tensor_inputs = [*WanPipeline._callback_tensor_inputs, "noise_pred"]  # noqa: RUF012 - a list, as diffusers

    def _latent_shape(self, adapter, params):
        return tuple(adapter.latent_shape(params["height"], params["width"], params["num_frames"]))

    def _encode_for_reward(self, p):
        embeds, _ = self.encode_prompt(
            prompt=p["prompt"], negative_prompt=None, do_classifier_free_guidance=False,
            num_videos_per_prompt=p["num_videos_per_prompt"], prompt_embeds=p["prompt_embeds"],
            max_sequence_length=p["max_sequence_length"], device=self._execution_device,
        )
        return {"prompt_embeds": embeds}
