"""Flow-matching math, one convention for the whole codebase (ALGORITHMS.md section 0).

Rectified flow as in diffusers' FlowMatchEulerDiscreteScheduler:

    x_t = (1 - t) * x0 + t * eps,   t in [0, 1],  t = 1 is pure noise
    v   = eps - x0                  (what the network predicts)
    sampling integrates t: 1 -> 0 with  x_{t - dt} = x_t - dt * v

Everything else (epsilon- and v-prediction models, scores) is converted into these quantities here, so every
loss and guidance rule is written once, in velocity terms.
"""

from __future__ import annotations

import math

import torch


def _bcast(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Per-sample t of shape (B,) -> (B, 1, 1, ...) for broadcasting against `like`."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(-1, *([1] * (like.ndim - 1))) if t.ndim else t


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps."""
    t = _bcast(t, x0)
    return (1 - t) * x0 + t * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The regression target of flow matching: v = eps - x0."""
    return eps - x0


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t) -> torch.Tensor:
    """x0_hat = x_t - t v."""
    return x_t - _bcast(t, x_t) * v


def eps_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t) -> torch.Tensor:
    """E[eps | x_t] = x_t + (1 - t) v."""
    return x_t + (1 - _bcast(t, x_t)) * v


def velocity_from_eps(x_t: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
    """Inverse of eps_from_velocity: v = (eps - x_t) / (1 - t)."""
    return (eps - x_t) / (1 - _bcast(t, x_t))


def velocity_from_x0(x_t: torch.Tensor, x0: torch.Tensor, t) -> torch.Tensor:
    """Inverse of x0_from_velocity: v = (x_t - x0) / t."""
    return (x_t - x0) / _bcast(t, x_t)


def score_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t) -> torch.Tensor:
    """grad log p_t(x_t) = -E[eps | x_t] / t = -(x_t + (1 - t) v) / t."""
    return -eps_from_velocity(x_t, v, t) / _bcast(t, x_t)


def velocity_from_score(x_t: torch.Tensor, score: torch.Tensor, t) -> torch.Tensor:
    """Inverse of score_from_velocity: v = (-t s - x_t) / (1 - t)."""
    t_ = _bcast(t, x_t)
    return (-t_ * score - x_t) / (1 - t_)


def conditional_score(x_t: torch.Tensor, x0: torch.Tensor, t) -> torch.Tensor:
    """grad_{x_t} log q(x_t | x0) = -eps / t with eps = (x_t - (1 - t) x0) / t."""
    t_ = _bcast(t, x_t)
    return -(x_t - (1 - t_) * x0) / t_**2


# ------------------------------------------------------------------------------ DDPM-style schedules
# A DDPM sample is x_s = sqrt(a) x0 + sqrt(1 - a) eps with a = alphas_cumprod[s]. Dividing by
# sqrt(a) + sqrt(1 - a) gives a flow sample with t = sqrt(1 - a) / (sqrt(a) + sqrt(1 - a)), so every
# epsilon- or v-prediction model is a velocity model after a change of scale and time.


def flow_t_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    s_a, s_1a = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    return s_1a / (s_a + s_1a)


def alpha_bar_from_flow_t(t: torch.Tensor) -> torch.Tensor:
    """Inverse of flow_t_from_alpha_bar: sigma = t / (1 - t) = sqrt((1 - a) / a)  =>  a = 1 / (1 + sigma^2)."""
    sigma = t / (1 - t)
    return 1 / (1 + sigma**2)


def ddpm_input_scale(t: torch.Tensor) -> torch.Tensor:
    """Factor taking a flow sample x_t to the DDPM sample x_s at the matching noise level: sqrt(a) / (1 - t)."""
    return alpha_bar_from_flow_t(t).sqrt() / (1 - t)


def velocity_from_ddpm_output(x_t: torch.Tensor, model_output: torch.Tensor, t, prediction_type: str) -> torch.Tensor:
    """Velocity (flow convention) from a DDPM model's output at the matching noise level.

    prediction_type: "epsilon" (SD1.5/SDXL) or "v_prediction" (v_ddpm = sqrt(a) eps - sqrt(1 - a) x0).
    """
    t_ = _bcast(t, x_t)
    if prediction_type == "epsilon":
        eps = model_output
    elif prediction_type == "v_prediction":
        a = alpha_bar_from_flow_t(t_)
        x_s = x_t * ddpm_input_scale(t_)
        eps = a.sqrt() * model_output + (1 - a).sqrt() * x_s
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon or v_prediction)")
    return velocity_from_eps(x_t, eps, t_)


def timestep_from_alpha_bar(alpha_bar: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Fractional DDPM timestep whose alpha_bar matches, interpolating log-SNR in the scheduler's table."""
    log_snr_table = torch.log(alphas_cumprod / (1 - alphas_cumprod)).to(alpha_bar)  # decreasing in s
    log_snr = torch.log(alpha_bar / (1 - alpha_bar)).clamp(log_snr_table[-1], log_snr_table[0])
    rev = log_snr_table.flip(0)  # increasing
    idx = torch.searchsorted(rev, log_snr).clamp(1, len(rev) - 1)
    lo, hi = rev[idx - 1], rev[idx]
    frac = (log_snr - lo) / (hi - lo)
    s_rev = (idx - 1).to(alpha_bar) + frac
    return (len(rev) - 1) - s_rev


# ------------------------------------------------------------------------------ timestep samplers
def sample_logit_normal(n: int, mean: float = 0.0, std: float = 1.0, generator=None, device=None) -> torch.Tensor:
    """t = sigmoid(N(mean, std)): SD3's training distribution (ALGORITHMS.md 0)."""
    z = torch.randn(n, generator=generator, device=device) * std + mean
    return torch.sigmoid(z)


def sample_uniform(n: int, eps: float = 1e-3, generator=None, device=None) -> torch.Tensor:
    return eps + (1 - 2 * eps) * torch.rand(n, generator=generator, device=device)


def sample_timesteps(n: int, kind: str = "logit_normal", generator=None, device=None, **kw) -> torch.Tensor:
    if kind == "logit_normal":
        return sample_logit_normal(n, generator=generator, device=device, **kw)
    if kind == "uniform":
        return sample_uniform(n, generator=generator, device=device, **kw)
    raise ValueError(f"unknown timestep sampler {kind!r} (logit_normal or uniform)")


def shifted_sigmas(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """Sampling schedule 1 -> 0 with SD3's time shift t' = shift t / (1 + (shift - 1) t); ends at exactly 0."""
    t = torch.linspace(1.0, 0.0, num_steps + 1)
    return shift * t / (1 + (shift - 1) * t)


def logit_normal_density(t: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    logit = torch.log(t / (1 - t))
    return torch.exp(-((logit - mean) ** 2) / (2 * std**2)) / (std * math.sqrt(2 * math.pi) * t * (1 - t))
