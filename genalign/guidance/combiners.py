"""Combiners for `genalign.sampling.sample_latents(..., combiner=...)`: RLG and NRG over any genalign adapter.

    from genalign.guidance import rlg_combiner, nrg_combiner
    comb = rlg_combiner(adapter, guidance_scale=4.5, experts={"dpo": 1.6})          # or scale=1.6: active LoRA
    comb = nrg_combiner(adapter, reward, guidance_scale=4.5, weights={"VQ": .5, "MQ": .5}, scale=2.0, inner=comb)
    latents = sample_latents(adapter, prompts, guidance_scale=4.5, combiner=comb)

A combiner is `combiner(x, t, cond, uncond) -> v` (flow time t, normalised latents, the adapter's encodings).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..sampling import cfg_velocity
from .core import NRGSettings, nrg_correction
from .denoiser import GuidedDenoiser, RLGPlan, denoiser_spec
from .latent_reward import check_compatible, latent_space_id, reward_dims


def denoiser_modules(pipe) -> list[torch.nn.Module]:
    """The denoiser module(s) of a pipeline: transformer (+ Wan 2.2's transformer_2) or unet."""
    mods = [getattr(pipe, n, None) for n in ("transformer", "transformer_2", "unet")]
    return [m for m in mods if m is not None]


class RLGCombiner:
    """CFG on the base and on each expert, then v_base + sum_k w_k (v_k - v_base) (ALGORITHMS.md 4).

    All passes run in ONE forward (CFG halves x passes) when peft's mixed-adapter batch applies, else one
    CFG-batched forward per pass; zero-weight passes are skipped. `plan` holds the resolved settings,
    `guided.stats` counts denoiser forwards and rows."""

    def __init__(self, adapter, *, guidance_scale: float, scale: float | None = None,
                 experts: Mapping[str, float] | None = None, window=None, mixed_batch="auto", reference=None):
        self.adapter = adapter
        self.guidance_scale = float(guidance_scale)
        modules = denoiser_modules(adapter.pipe)
        self.plan = RLGPlan.build(modules, scale=scale, experts=experts, window=window, mixed_batch=mixed_batch,
                                  reference=reference)
        self.guided = GuidedDenoiser(modules, denoiser_spec(adapter), rlg=self.plan)

    def __call__(self, x, t, cond, uncond):
        # RLG commutes with CFG: combining every denoiser call gives CFG(base) + w (CFG(ft) - CFG(base)).
        with self.guided.installed():
            return cfg_velocity(self.adapter, x, t, cond, uncond, self.guidance_scale)


class NRGCombiner:
    """v_cfg - lambda min(t/(1-t), max) grad_x R(x_t, t, c) inside the window (ALGORITHMS.md 5).

    `inner`: the combiner giving v_cfg (e.g. an RLGCombiner); None = plain CFG at guidance_scale.
    `prompts`: needed only by reward models with conditioning == "prompts"."""

    def __init__(self, adapter, reward, *, guidance_scale: float, weights: Mapping[str, float] | None = None,
                 scale: float = 1.0, window=None, max_factor: float = 10.0, inner=None, prompts=None,
                 latent_shape=None):
        self.adapter, self.reward, self.inner, self.prompts = adapter, reward, inner, prompts
        self.guidance_scale = float(guidance_scale)
        self.settings = NRGSettings.build(reward_dims(reward), weights, scale, window, max_factor)
        self._checked = False
        if latent_shape is not None:
            self.check(latent_shape)
        self.evals = 0

    def check(self, latent_shape) -> None:
        """Refuse a reward model made for another latent space or resolution (GuidanceError)."""
        check_compatible(self.reward, latent_space_id(self.adapter), tuple(latent_shape))
        self._checked = True

    def __call__(self, x, t, cond, uncond):
        if not self._checked:  # the first call comes before the first denoiser forward
            self.check(x.shape[1:])
        if self.inner is not None:
            v = self.inner(x, t, cond, uncond)
        else:
            v = cfg_velocity(self.adapter, x, t, cond, uncond, self.guidance_scale)
        kind = getattr(self.reward, "conditioning", "cond")
        rcond = self.prompts if kind == "prompts" else (None if kind == "none" else cond)
        corr = nrg_correction(self.reward, x, t, rcond, self.settings)
        if corr is None:
            return v
        self.evals += 1
        return v + corr


def rlg_combiner(adapter, **kwargs) -> RLGCombiner:
    return RLGCombiner(adapter, **kwargs)


def nrg_combiner(adapter, reward, **kwargs) -> NRGCombiner:
    return NRGCombiner(adapter, reward, **kwargs)
