"""Each identity of ALGORITHMS.md section 0, checked numerically."""

import math

import pytest
import torch

from genalign import flow


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.95], dtype=torch.float64)
    return x0, eps, t


def test_interpolation_endpoints_and_velocity(batch):
    x0, eps, t = batch
    assert torch.allclose(flow.interpolate(x0, eps, torch.zeros(5, dtype=torch.float64)), x0)
    assert torch.allclose(flow.interpolate(x0, eps, torch.ones(5, dtype=torch.float64)), eps)
    # d x_t / dt = eps - x0: finite difference of the interpolation
    h = 1e-6
    fd = (flow.interpolate(x0, eps, t + h) - flow.interpolate(x0, eps, t - h)) / (2 * h)
    assert torch.allclose(fd, flow.velocity_target(x0, eps), atol=1e-6)


def test_x0_and_eps_recovered_from_exact_velocity(batch):
    x0, eps, t = batch
    x_t = flow.interpolate(x0, eps, t)
    v = flow.velocity_target(x0, eps)
    assert torch.allclose(flow.x0_from_velocity(x_t, v, t), x0)
    assert torch.allclose(flow.eps_from_velocity(x_t, v, t), eps)
    assert torch.allclose(flow.velocity_from_eps(x_t, eps, t), v)
    assert torch.allclose(flow.velocity_from_x0(x_t, x0, t), v)


def test_score_conversions_round_trip_and_match_gaussian_score():
    # For x0 ~ N(0, s^2 I): p_t = N(0, ((1-t)^2 s^2 + t^2) I), score = -x / var_t, and the exact
    # velocity is E[eps - x0 | x_t] = (t - (1-t) s^2) / var_t * x_t.
    s, t = 0.7, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64)
    var_t = ((1 - t) ** 2 * s**2 + t**2)[:, None]
    v_exact = (t[:, None] - (1 - t[:, None]) * s**2) / var_t * x
    assert torch.allclose(flow.score_from_velocity(x, v_exact, t), -x / var_t)
    assert torch.allclose(flow.velocity_from_score(x, -x / var_t, t), v_exact)


def test_conditional_score_is_gradient_of_log_q(batch):
    x0, eps, t = batch
    x_t = flow.interpolate(x0, eps, t).requires_grad_(True)
    tb = t.view(-1, 1, 1, 1)
    log_q = (-((x_t - (1 - tb) * x0) ** 2) / (2 * tb**2)).sum()
    (grad,) = torch.autograd.grad(log_q, x_t)
    assert torch.allclose(flow.conditional_score(x_t, x0, t), grad)
    assert torch.allclose(flow.conditional_score(x_t.detach(), x0, t), -eps / tb)


def test_ddpm_time_mapping_round_trips():
    a = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    assert torch.allclose(flow.alpha_bar_from_flow_t(flow.flow_t_from_alpha_bar(a)), a)
    # the scaled DDPM sample equals the flow sample: sqrt(a) x0 + sqrt(1-a) eps = scale * ((1-t) x0 + t eps)
    x0, eps = torch.randn(2, 50, dtype=torch.float64)
    t = flow.flow_t_from_alpha_bar(a)
    ddpm = a.sqrt() * x0 + (1 - a).sqrt() * eps
    assert torch.allclose(ddpm, flow.ddpm_input_scale(t) * flow.interpolate(x0, eps, t))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_velocity_from_ddpm_outputs(prediction_type):
    a = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    x0, eps = torch.randn(2, 3, 4, dtype=torch.float64)
    t = flow.flow_t_from_alpha_bar(a)
    x_t = flow.interpolate(x0, eps, t)
    a_ = a[:, None]
    out = eps if prediction_type == "epsilon" else a_.sqrt() * eps - (1 - a_).sqrt() * x0
    assert torch.allclose(flow.velocity_from_ddpm_output(x_t, out, t, prediction_type), eps - x0)
    with pytest.raises(ValueError, match="sample"):
        flow.velocity_from_ddpm_output(x_t, out, t, "sample")


def test_timestep_from_alpha_bar_inverts_the_table():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    table = torch.cumprod(1 - betas, 0)
    s = torch.tensor([0, 10, 500, 999])
    assert torch.allclose(flow.timestep_from_alpha_bar(table[s], table), s.double(), atol=1e-6)
    mid = flow.timestep_from_alpha_bar(table[[10, 11]].mean().reshape(1), table)
    assert 10 < mid.item() < 11


def test_timestep_samplers_have_the_right_distributions():
    g = torch.Generator().manual_seed(0)
    t = flow.sample_timesteps(200_000, "logit_normal", generator=g)
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item()) < 0.01 and abs(logit.std().item() - 1) < 0.01
    # density integrates to 1
    grid = torch.linspace(1e-4, 1 - 1e-4, 20001, dtype=torch.float64)
    assert math.isclose(torch.trapezoid(flow.logit_normal_density(grid), grid).item(), 1.0, abs_tol=1e-3)
    u = flow.sample_timesteps(200_000, "uniform", generator=g)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.005
    with pytest.raises(ValueError, match="unknown timestep sampler"):
        flow.sample_timesteps(3, "beta")


def test_shifted_sigmas_match_sd3_shift():
    s = flow.shifted_sigmas(10, shift=3.0)
    assert s[0] == 1.0 and s[-1] == 0.0 and torch.all(s[1:] < s[:-1])
    t = torch.tensor(0.5)
    assert torch.isclose(s[5], 3 * t / (1 + 2 * t))
