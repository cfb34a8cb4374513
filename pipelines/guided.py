"""The shared part of genalign's guided diffusers pipelines: extra `__call__` arguments for RLG and Flow-NRG.

How it works: the stock denoising loop of the diffusers class runs unchanged, and for the duration of the call every
call of its denoiser is replaced by the guided combination (`genalign.guidance.denoiser`):

    out = sum_p a_p(t) denoiser_p(x, t, cond)   [+ NRG term]     p in {base, LoRA experts}, a_p = 0 skipped

Because RLG and the NRG term commute with CFG, the stock CFG (SD3/SD/SDXL batched, FLUX true CFG, Wan separate
calls, SD3 skip-layer guidance) then yields exactly CFG(base) + sum_k w_k (CFG(expert_k) - CFG(base)) [+ NRG].
So every stock argument, callback, offloading hook, scheduler and LoRA loader keeps working, and with guidance
off the call IS the stock call (bit-identical output). The callback can read the combined model output through
`callback_on_step_end_tensor_inputs=["noise_pred"]` (after CFG, RLG and NRG).

Arguments (all optional; none given = the stock pipeline):

- rlg_scale: float in [0, 3]: RLG weight w of the fine-tuned model = the pipeline's denoiser as configured (the
  active LoRA adapter(s) at their weights; or fully fine-tuned weights with `rlg_reference` as the base).
  0 = base (LoRA off), 1 = fine-tuned, 0..1 interpolates, >1 extrapolates (public default 1.6).
- rlg_experts: {adapter name: weight in [0, 3]}: several LoRA experts, v = v_base + sum_k w_k (v_k - v_base),
  each expert evaluated with only its adapter on. Exclusive with rlg_scale.
- rlg_window: (t_start, t_stop) in flow time [0, 1] (1 = noise; for SD/SDXL the noise level mapped to flow
  time). Outside it the fine-tuned model is used (weights rescaled to sum to 1). Default: whole trajectory.
- rlg_mixed_batch: "auto" (default: one forward over base + experts with peft's mixed-adapter batch when
  possible and, on CUDA, when the latents are small enough for it to be faster (measured: faster at 512 px,
  slower at 1024 px on an SD3.5-medium-sized model), else sequential passes), True (always mixed when
  possible, error otherwise), False (sequential).
- rlg_reference: a base denoiser module of the same class, for fully fine-tuned (non-LoRA) models.
- nrg_reward_model: a noise-aware latent reward model (`genalign.guidance.LatentRewardModel` or any object with
  its interface) for Flow-NRG; flow pipelines only (SD3, FLUX, Wan).
- nrg_weights: {dimension: weight}, e.g. {"VQ": 0.5, "MQ": 0.5, "TA": 0}; missing dimensions weigh 0; None =
  1 / D each.
- nrg_scale: lambda >= 0 (default 1.0); nrg_window: (t_start, t_stop), default whole trajectory;
  nrg_max_factor: clip of t / (1 - t) (default 10).

Every bad argument raises `genalign.guidance.GuidanceError` before the first denoising step (and before the
text encoders run): weights out of range, unknown adapters, nrg_weights naming dimensions the reward model
lacks, a reward model made for another latent space or resolution.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from genalign.files import shared_as_written
from genalign.guidance.core import NRG_DEFAULT_MAX_FACTOR, GuidanceError, NRGSettings
from genalign.guidance.denoiser import GuidedDenoiser, NRGPlan, RLGPlan, denoiser_spec
from genalign.guidance.latent_reward import check_compatible, latent_space_id, reward_dims


class GuidedPipelineMixin:
    """Mixed into a concrete diffusers pipeline class (first in the bases)."""

    _genalign_adapter_cls: type = None  # the genalign.models adapter of the family
    _stock_class: type = None
    _nrg_supported: bool = True
    _guidance_modules: tuple[str, ...] = ("transformer",)

    last_guidance_stats: dict | None = None  # denoiser calls / forwards / rows of the last guided call

    def __call__(self, *args, rlg_scale: float | None = None, rlg_experts: dict[str, float] | None = None,
                 rlg_window: tuple[float, float] | None = None, rlg_mixed_batch: bool | str = "auto",
                 rlg_reference: torch.nn.Module | None = None, nrg_reward_model=None,
                 nrg_weights: dict[str, float] | None = None, nrg_scale: float = 1.0,
                 nrg_window: tuple[float, float] | None = None, nrg_max_factor: float = NRG_DEFAULT_MAX_FACTOR,
                 **kwargs):
        guided = self.prepare_guidance(
            args, kwargs, rlg_scale=rlg_scale, rlg_experts=rlg_experts, rlg_window=rlg_window,
            rlg_mixed_batch=rlg_mixed_batch, rlg_reference=rlg_reference, nrg_reward_model=nrg_reward_model,
            nrg_weights=nrg_weights, nrg_scale=nrg_scale, nrg_window=nrg_window, nrg_max_factor=nrg_max_factor,
        )
        if guided is None:
            self.last_guidance_stats = None
            return super().__call__(*args, **kwargs)
        with guided.installed():
            out = super().__call__(*args, **kwargs)
        self.last_guidance_stats = dict(guided.stats, mixed_batch=guided.stats["mixed_forwards"] > 0)
        return out

    # ------------------------------------------------------------------------------------------ validation
    def guidance_modules(self) -> list[torch.nn.Module]:
        return [m for m in (getattr(self, n, None) for n in self._guidance_modules) if m is not None]

    def genalign_adapter(self):
        """A genalign model adapter viewing this pipeline, built WITHOUT the adapter constructor's side effects
        (it puts models in eval mode, which would break a training loop that samples for validation)."""
        cls = self._genalign_adapter_cls
        adapter = cls.__new__(cls)
        adapter.pipe = self
        if cls.family == "unet":
            adapter.prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
            adapter.alphas_cumprod = torch.as_tensor(self.scheduler.alphas_cumprod, dtype=torch.float64)
        return adapter

    def bind_call_arguments(self, args, kwargs) -> dict:
        """The stock __call__'s arguments with defaults applied (positional ones by name)."""
        sig = inspect.signature(self._stock_class.__call__)
        try:
            bound = sig.bind(self, *args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{type(self).__name__}.__call__: {e}") from None
        bound.apply_defaults()
        params = dict(bound.arguments)
        params.pop("self", None)
        return params

    def prepare_guidance(self, args, kwargs, *, rlg_scale, rlg_experts, rlg_window, rlg_mixed_batch,
                         rlg_reference, nrg_reward_model, nrg_weights, nrg_scale, nrg_window,
                         nrg_max_factor) -> GuidedDenoiser | None:
        """Validate the guidance arguments and build the per-call denoiser wrapper (None: guidance off)."""
        want_rlg = rlg_scale is not None or bool(rlg_experts) or rlg_reference is not None
        if rlg_window is not None and not want_rlg:
            raise GuidanceError("rlg_window given without rlg_scale or rlg_experts")
        want_nrg = nrg_reward_model is not None
        if not want_nrg and (nrg_weights is not None or nrg_window is not None):
            raise GuidanceError("nrg_weights / nrg_window given without nrg_reward_model")
        if not (want_rlg or want_nrg):
            return None
        modules = self.guidance_modules()
        adapter = self.genalign_adapter()
        rlg = None
        if want_rlg:
            if rlg_reference is not None and rlg_scale is None:
                raise GuidanceError("rlg_reference needs rlg_scale (the weight of the pipeline's own denoiser)")
            rlg = RLGPlan.build(modules, scale=rlg_scale, experts=rlg_experts, window=rlg_window,
                                mixed_batch=rlg_mixed_batch, reference=rlg_reference)
        nrg = None
        if want_nrg:
            if not self._nrg_supported:
                raise GuidanceError(f"Flow-NRG needs a flow-matching pipeline (SD3, FLUX, Wan); "
                                    f"{self._stock_class.__name__} is an epsilon/v-prediction model")
            settings = NRGSettings.build(reward_dims(nrg_reward_model), nrg_weights, nrg_scale, nrg_window,
                                         nrg_max_factor)
            params = self.bind_call_arguments(args, kwargs)
            check_compatible(nrg_reward_model, latent_space_id(adapter), self._latent_shape(adapter, params))
            if settings.active:
                cond, batch = self._nrg_condition(nrg_reward_model, params)
                nrg = NRGPlan(nrg_reward_model, settings, cond, batch)
        if rlg is None and nrg is None:
            return None
        return GuidedDenoiser(modules, denoiser_spec(adapter), rlg=rlg, nrg=nrg)

    # ------------------------------------------------------------------------------------------ family hooks
    def _latent_shape(self, adapter, params: dict) -> tuple[int, ...]:
        height = params.get("height") or self.default_sample_size * self.vae_scale_factor
        width = params.get("width") or self.default_sample_size * self.vae_scale_factor
        return tuple(adapter.latent_shape(height, width, params.get("num_frames")))

    def _batch_size(self, params: dict) -> int:
        prompt = params.get("prompt")
        per = params.get("num_images_per_prompt", params.get("num_videos_per_prompt", 1)) or 1
        if isinstance(prompt, str):
            n = 1
        elif prompt is not None:
            n = len(prompt)
        else:
            n = params["prompt_embeds"].shape[0]
        return n * per

    def _nrg_condition(self, reward, params: dict):
        """(the reward model's conditioning for the generated batch, the batch size)."""
        batch = self._batch_size(params)
        kind = getattr(reward, "conditioning", "cond")
        if kind == "none":
            return None, batch
        if kind == "prompts":
            prompt = params.get("prompt")
            if prompt is None:
                raise GuidanceError("this latent reward model reads prompts; pass `prompt`, not prompt_embeds")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            per = batch // len(prompts)
            return [p for p in prompts for _ in range(per)], batch
        cond = self._encode_for_reward(params)
        n = next(iter(cond.values())).shape[0]
        if n != batch:
            raise GuidanceError(f"the prompt encodings have {n} rows for a batch of {batch}")
        return cond, batch

    def _encode_for_reward(self, params: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory, *args, **kwargs):
        """As the stock pipeline, and the folder stays a stock folder: model_index.json names the stock class
        (guidance is a per-call option; the weights are the stock ones)."""
        with shared_as_written(save_directory):  # safetensors writes 0600 files (genalign.files)
            out = super().save_pretrained(save_directory, *args, **kwargs)
        index = Path(save_directory) / "model_index.json"
        if index.is_file():
            data = json.loads(index.read_text())
            data["_class_name"] = self._stock_class.__name__
            index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        return out
