"""The guidance math, written once over model outputs (ALGORITHMS.md sections 4 and 5).

Everything here is a plain function of tensors (or of velocity functions): no models, no pipelines. The samplers
(`genalign.sampling`), the diffusers pipelines (`genalign.pipelines`) and the toy (`genalign.world.toy2d`) all call
these, so each rule has one implementation and one set of tests.

RLG (Jin et al., "Reinforcement Learning Guidance", arXiv 2508.21016)
---------------------------------------------------------------------
CFG is applied to each model first, then the models are combined:

    v_base = v_ref(x, 0) + g (v_ref(x, c) - v_ref(x, 0))
    v_k    = v_k(x, 0)   + g (v_k(x, c)   - v_k(x, 0))          (each fine-tuned expert k)
    v_RLG  = v_base + sum_k w_k (v_k - v_base)

w = 0 is the base model, w = 1 the fine-tuned one, 0 < w < 1 interpolates, w > 1 extrapolates (the public code's
default is 1.6). Allowed weights: RLG_WEIGHT_RANGE = [0, 3] for each w_k (the public code's range is 1..3; the
interpolating side 0..1 is included); anything else raises before sampling. The combination is affine (the
weights of the passes sum to 1), so it holds for velocity, epsilon, x0 or score outputs alike, and it commutes
with CFG: combining the conditional and the unconditional outputs separately and then applying CFG gives the same
v_RLG. `genalign.pipelines` uses that to combine at the level of one denoiser call.

The same formula written with one weight per *pass*: a_base = 1 - sum_k w_k, a_k = w_k, v = sum_p a_p v_p.
A pass whose weight is 0 is not evaluated (at w = 0 only the base runs, at w = 1 only the fine-tuned model).

Window: RLG can be restricted to flow times t in [t_lo, t_hi] (t = 1 is noise). Outside the window the sampler
falls back to the fine-tuned model(s): the expert weights are rescaled to sum to 1 (one expert: w = 1), so the
base pass is skipped there; if all weights are 0 the base model is used. (The public code applies RLG over the
whole trajectory, which is the default here: window None.)

Flow-NRG (Liu et al., "Improving Video Generation with Human Feedback", arXiv 2501.13918)
-----------------------------------------------------------------------------------------
From the tilted optimum p*(x0 | c) ∝ p_ref(x0 | c) exp(lambda R(x0, c)) and the identities of ALGORITHMS.md 0:

    v_guided = v_cfg - lambda * min(t / (1 - t), max_factor) * grad_{x_t} R(x_t, t, c),   R = sum_d w_d r_d

applied after CFG, only inside the t-window, with a noise-aware latent reward model R (`latent_reward.py`). The
factor t / (1 - t) diverges at t = 1 and is clipped at `max_factor` (default 10). The gradient is taken under
`torch.enable_grad()`, so it works inside the diffusers pipelines' `@torch.no_grad()` `__call__`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

RLG_WEIGHT_RANGE = (0.0, 3.0)
NRG_DEFAULT_MAX_FACTOR = 10.0
BASE = "__base__"  # peft's name for "no adapter" in mixed-adapter batches; also the base pass here


class GuidanceError(ValueError):
    """Bad guidance arguments (scale out of range, unknown adapter or reward dimension, wrong latent space...).
    Always raised before the first denoising step."""


# ------------------------------------------------------------------------------------------------ CFG
def cfg(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: v_uncond + g (v_cond - v_uncond)."""
    return v_uncond + scale * (v_cond - v_uncond)


# ------------------------------------------------------------------------------------------------ RLG
def check_weight(name: str, w, bounds: tuple[float, float] = RLG_WEIGHT_RANGE) -> float:
    try:
        w = float(w)
    except (TypeError, ValueError):
        raise GuidanceError(f"{name} must be a number, got {w!r}") from None
    lo, hi = bounds
    if not math.isfinite(w) or not lo <= w <= hi:
        raise GuidanceError(f"{name} = {w} is outside the allowed range [{lo}, {hi}] (0 = base model, 1 = the "
                            "fine-tuned model, 0..1 interpolates, >1 extrapolates)")
    return w


def check_window(name: str, window) -> tuple[float, float] | None:
    """None (whole trajectory) or (t_lo, t_hi) with 0 <= t_lo <= t_hi <= 1, in flow time (t = 1 is noise)."""
    if window is None:
        return None
    try:
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError):
        raise GuidanceError(f"{name} must be None or a pair (t_start, t_stop) in [0, 1], got {window!r}") from None
    lo, hi = min(lo, hi), max(lo, hi)  # (start, stop) along sampling runs from high t to low t: either order
    if not (0.0 <= lo and hi <= 1.0):
        raise GuidanceError(f"{name} = {tuple(window)} must lie in [0, 1] (flow time, t = 1 is noise)")
    return (lo, hi)


def in_window(t: float, window: tuple[float, float] | None) -> bool:
    return window is None or window[0] <= t <= window[1]


def pass_weights(expert_weights: Mapping[str, float]) -> dict[str, float]:
    """{BASE: 1 - sum w_k, k: w_k}: the weight of each model's output in v_RLG (they sum to 1)."""
    out = {BASE: 1.0 - sum(expert_weights.values())}
    out.update(expert_weights)
    return out


def expert_weights_at(t: float, weights: Mapping[str, float], window: tuple[float, float] | None) -> dict[str, float]:
    """The expert weights in force at flow time t: `weights` inside the window, else the fine-tuned fallback
    (weights rescaled to sum to 1; all zero stays all zero, i.e. the base model)."""
    if in_window(t, window):
        return dict(weights)
    total = sum(weights.values())
    if total == 0:
        return dict(weights)
    return {k: w / total for k, w in weights.items()}


def nonzero(weights: Mapping[str, float]) -> dict[str, float]:
    """Drop the passes whose weight is zero (they are not evaluated)."""
    return {k: w for k, w in weights.items() if w != 0.0}


def combine(outputs: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """sum_p a_p out_p over the passes in `outputs` (weights as from `pass_weights`, zero ones already dropped).

    One pass of weight exactly 1 is returned as is (bit-exact w = 0 and w = 1). Otherwise the sum runs in float32
    at least and is cast back to the outputs' dtype."""
    names = list(outputs)
    if len(names) == 1 and weights[names[0]] == 1.0:
        return outputs[names[0]]
    dtype = outputs[names[0]].dtype
    acc = torch.promote_types(dtype, torch.float32)
    total = sum(float(weights[k]) * outputs[k].to(acc) for k in names)
    return total.to(dtype)


def rlg_combine(v_base: torch.Tensor, v_experts: Mapping[str, torch.Tensor] | Sequence[torch.Tensor] | torch.Tensor,
                weights: Mapping[str, float] | Sequence[float] | float) -> torch.Tensor:
    """v_base + sum_k w_k (v_k - v_base), written as in the paper (for checks and for callers holding outputs).

    v_experts / weights: one tensor and one float, sequences of equal length, or dicts with the same keys."""
    if isinstance(v_experts, torch.Tensor):
        v_experts, weights = [v_experts], [float(weights)]
    if isinstance(v_experts, Mapping):
        items = [(v_experts[k], float(weights[k])) for k in v_experts]
    else:
        if len(v_experts) != len(weights):
            raise GuidanceError(f"{len(v_experts)} expert outputs but {len(weights)} weights")
        items = list(zip(v_experts, (float(w) for w in weights)))
    out = v_base
    for v_k, w_k in items:
        out = out + w_k * (v_k - v_base)
    return out


VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def rlg_velocity(base: VelocityFn, experts: Mapping[str, VelocityFn], weights: Mapping[str, float],
                 window: tuple[float, float] | None = None) -> VelocityFn:
    """RLG over plain velocity functions v(x, t) (CFG, if any, already inside them), for any sampler.

    Passes of weight zero at the current t are not called. t is the flow time, one value per sample (all equal)."""
    weights = {k: check_weight(f"weight of expert {k!r}", w) for k, w in weights.items()}
    if set(weights) != set(experts):
        raise GuidanceError(f"experts {sorted(experts)} and weights {sorted(weights)} name different models")
    window = check_window("window", window)
    fns = {BASE: base, **experts}

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = nonzero(pass_weights(expert_weights_at(float(torch.as_tensor(t).reshape(-1)[0]), weights, window)))
        return combine({k: fns[k](x, t) for k in a}, a)

    return velocity


# ------------------------------------------------------------------------------------------------ NRG
@dataclass
class NRGSettings:
    """Validated Flow-NRG settings. weights: reward dimension -> w_d (dimensions left out weigh 0)."""

    weights: dict[str, float]
    scale: float = 1.0  # lambda
    window: tuple[float, float] | None = None
    max_factor: float = NRG_DEFAULT_MAX_FACTOR

    @classmethod
    def build(cls, dims: Sequence[str], weights: Mapping[str, float] | None = None, scale: float = 1.0,
              window=None, max_factor: float = NRG_DEFAULT_MAX_FACTOR) -> NRGSettings:
        """weights None: every dimension of the model with weight 1 / D. Raises GuidanceError on dimensions the
        model lacks, non-finite weights, a negative or non-finite scale, a bad window or max_factor <= 0."""
        dims = tuple(dims)
        if weights is None:
            weights = {d: 1.0 / len(dims) for d in dims}
        if not isinstance(weights, Mapping):
            raise GuidanceError(f"nrg_weights must be a dict dimension -> weight, got {type(weights).__name__}")
        unknown = [d for d in weights if d not in dims]
        if unknown:
            raise GuidanceError(f"nrg_weights names dimension(s) {unknown} that the latent reward model does not "
                                f"have (it has {list(dims)})")
        clean = {}
        for d, w in weights.items():
            try:
                w = float(w)
            except (TypeError, ValueError):
                raise GuidanceError(f"nrg_weights[{d!r}] must be a number, got {w!r}") from None
            if not math.isfinite(w):
                raise GuidanceError(f"nrg_weights[{d!r}] = {w} is not finite")
            clean[d] = w
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise GuidanceError(f"nrg_scale must be a number, got {scale!r}") from None
        if not math.isfinite(scale) or scale < 0:
            raise GuidanceError(f"nrg_scale = {scale} must be finite and >= 0 (lambda of the tilt exp(lambda R))")
        max_factor = float(max_factor)
        if not math.isfinite(max_factor) or max_factor <= 0:
            raise GuidanceError(f"nrg_max_factor = {max_factor} must be finite and > 0")
        return cls(clean, scale, check_window("nrg_window", window), max_factor)

    @property
    def active(self) -> bool:
        return self.scale != 0 and any(w != 0 for w in self.weights.values())


def nrg_factor(t: torch.Tensor, max_factor: float = NRG_DEFAULT_MAX_FACTOR) -> torch.Tensor:
    """t / (1 - t), clipped at max_factor (t = 1 gives max_factor, not inf)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    with torch.no_grad():
        f = torch.where(t < 1, t / (1 - t).clamp_min(1e-300), torch.full_like(t, math.inf))
    return f.clamp(max=max_factor)


def weighted_reward(scores: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """R = sum_d w_d r_d over the dimensions with a nonzero weight."""
    terms = [w * scores[d] for d, w in weights.items() if w != 0]
    if not terms:
        raise GuidanceError("every NRG weight is zero")
    return torch.stack(terms).sum(0)


def reward_gradient(reward, x_t: torch.Tensor, t: torch.Tensor, cond, weights: Mapping[str, float]) -> torch.Tensor:
    """grad_{x_t} R(x_t, t, c) per sample, under torch.enable_grad() (works inside no-grad pipelines).

    Only x_t is differentiated (torch.autograd.grad): the reward model's parameters get no .grad."""
    with torch.enable_grad():
        x = x_t.detach().to(_param_dtype(reward, x_t.dtype)).requires_grad_(True)
        t_in = torch.as_tensor(t, device=x.device, dtype=x.dtype).reshape(-1).expand(x.shape[0])
        R = weighted_reward(reward(x, t_in, cond), weights)
        (grad,) = torch.autograd.grad(R.sum(), x)
    return grad.to(x_t.dtype)


def _param_dtype(module, default):
    try:
        return next(module.parameters()).dtype
    except (AttributeError, StopIteration, TypeError):
        return default


def nrg_correction(reward, x_t: torch.Tensor, t: torch.Tensor, cond, settings: NRGSettings) -> torch.Tensor | None:
    """The term added to the CFG velocity: -lambda * min(t/(1-t), max) * grad_{x_t} R, zero outside the window.

    t: flow time, (B,) or a scalar. Returns None when nothing is to be added at this t (outside the window or
    lambda = 0), so callers skip the reward model entirely."""
    t = torch.as_tensor(t, device=x_t.device).reshape(-1)
    if not settings.active or not in_window(float(t[0]), settings.window):
        return None
    grad = reward_gradient(reward, x_t, t, cond, settings.weights)
    factor = nrg_factor(t.detach().cpu(), settings.max_factor).to(grad.device, torch.float32)
    factor = factor.expand(x_t.shape[0]).reshape(-1, *([1] * (x_t.ndim - 1)))
    return (-settings.scale * factor * grad.float()).to(x_t.dtype)
