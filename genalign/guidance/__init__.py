"""Guidance rules as model-output combiners any sampler can use (ALGORITHMS.md sections 4 and 5).

- RLG (Reinforcement Learning Guidance, Jin et al., arXiv 2508.21016): CFG on the base and on each fine-tuned
  model, then v = v_base + sum_k w_k (v_k - v_base); weights in RLG_WEIGHT_RANGE = [0, 3]; optional t-window
  outside which the fine-tuned model is used; zero-weight passes skipped; base and LoRA experts in one peft
  mixed-adapter batch when possible.
- Flow-NRG (Liu et al., arXiv 2501.13918): v = v_cfg - lambda min(t/(1-t), max) grad_{x_t} R(x_t, t, c) with a
  noise-aware latent reward model (`LatentRewardModel`), per-dimension weights chosen per call, a t-window.

Layers: `core` (the math over tensors and velocity functions), `lora` (peft state, mixed-adapter batches),
`denoiser` (the per-denoiser-call mechanism the pipelines use), `combiners` (for genalign.sampling),
`latent_reward` (the reward model interface, network, checkpoints and the pair loss for training).
"""

from .core import (
    BASE,
    NRG_DEFAULT_MAX_FACTOR,
    RLG_WEIGHT_RANGE,
    GuidanceError,
    NRGSettings,
    cfg,
    check_weight,
    check_window,
    combine,
    expert_weights_at,
    nrg_correction,
    nrg_factor,
    pass_weights,
    reward_gradient,
    rlg_combine,
    rlg_velocity,
    weighted_reward,
)
from .denoiser import CURRENT, DenoiserSpec, GuidedDenoiser, NRGPlan, RLGPlan, denoiser_spec
from .latent_reward import (
    LatentRewardConfig,
    LatentRewardLoadError,
    LatentRewardModel,
    check_compatible,
    latent_space_id,
    pair_loss,
    reward_dims,
)

__all__ = [
    "BASE",
    "CURRENT",
    "NRG_DEFAULT_MAX_FACTOR",
    "RLG_WEIGHT_RANGE",
    "DenoiserSpec",
    "GuidanceError",
    "GuidedDenoiser",
    "LatentRewardConfig",
    "LatentRewardLoadError",
    "LatentRewardModel",
    "NRGCombiner",
    "NRGPlan",
    "NRGSettings",
    "RLGCombiner",
    "RLGPlan",
    "cfg",
    "check_compatible",
    "check_weight",
    "check_window",
    "combine",
    "denoiser_spec",
    "expert_weights_at",
    "latent_space_id",
    "nrg_combiner",
    "nrg_correction",
    "nrg_factor",
    "pair_loss",
    "pass_weights",
    "reward_dims",
    "reward_gradient",
    "rlg_combine",
    "rlg_combiner",
    "rlg_velocity",
    "weighted_reward",
]


def __getattr__(name):
    # The combiners import genalign.sampling (tqdm, numpy); loaded on first use.
    if name in ("NRGCombiner", "RLGCombiner", "nrg_combiner", "rlg_combiner", "denoiser_modules"):
        from . import combiners

        return getattr(combiners, name)
    raise AttributeError(name)
