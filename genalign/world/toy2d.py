"""An exact 2-D toy: a Gaussian-mixture flow model whose velocity field is known in closed form.

The KL-regularised optimum of alignment, p*(x) ∝ p_ref(x) exp(r(x) / beta), can be sampled exactly here by
importance resampling (and, for a linear reward, in closed form), so tests can check the theory behind each
method: DPO/RWR move a model toward the tilt, RLG with weight w approximates the optimum for beta / w, NRG
approximates the tilt. Distances between sample sets use the energy distance.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import flow


@dataclass
class GaussianMixture2D:
    means: torch.Tensor  # (K, 2)
    stds: torch.Tensor  # (K,)
    weights: torch.Tensor  # (K,), sums to 1

    @classmethod
    def default(cls) -> GaussianMixture2D:
        """Four modes on a square; the reward below prefers the right-hand ones."""
        means = torch.tensor([[-1.5, -1.5], [-1.5, 1.5], [1.5, -1.5], [1.5, 1.5]])
        return cls(means, torch.full((4,), 0.35), torch.full((4,), 0.25))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        return self.means[k] + self.stds[k, None] * torch.randn(n, 2, generator=generator)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        d2 = ((x[:, None, :] - self.means[None]) ** 2).sum(-1)
        var = self.stds[None] ** 2
        logp = -d2 / (2 * var) - torch.log(2 * torch.pi * var) + torch.log(self.weights[None])
        return torch.logsumexp(logp, dim=1)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Exact marginal velocity E[eps - x0 | x_t] of the rectified flow from this mixture."""
        t = torch.as_tensor(t, dtype=x_t.dtype).reshape(-1, 1).expand(len(x_t), 1)
        var_t = (1 - t) ** 2 * self.stds[None] ** 2 + t**2  # (B, K)
        mean_t = (1 - t)[:, :, None] * self.means[None]  # (B, K, 2)
        resid = x_t[:, None, :] - mean_t
        logw = torch.log(self.weights[None]) - (resid**2).sum(-1) / (2 * var_t) - torch.log(var_t)
        post = torch.softmax(logw, dim=1)  # p(k | x_t)
        e_x0 = self.means[None] + ((1 - t) * self.stds[None] ** 2 / var_t)[..., None] * resid
        e_eps = (t / var_t)[..., None] * resid
        return (post[..., None] * (e_eps - e_x0)).sum(1)

    def tilted_linear(self, direction: torch.Tensor, beta: float) -> GaussianMixture2D:
        """Exact tilt by r(x) = direction . x: each component's mean moves by s^2 a / beta, weights by exp(...)."""
        a = direction / beta
        means = self.means + self.stds[:, None] ** 2 * a[None]
        logw = torch.log(self.weights) + self.means @ a + 0.5 * self.stds**2 * (a @ a)
        return GaussianMixture2D(means, self.stds.clone(), torch.softmax(logw, 0))


def linear_reward(direction=(1.0, 0.0)) -> Callable[[torch.Tensor], torch.Tensor]:
    d = torch.tensor(direction)
    return lambda x: x @ d


def sample_tilted(base: GaussianMixture2D, reward: Callable[[torch.Tensor], torch.Tensor], beta: float, n: int,
                  generator: torch.Generator | None = None, oversample: int = 50) -> torch.Tensor:
    """Exact-in-the-limit samples of p_ref(x) exp(r(x) / beta) by importance resampling of base samples."""
    pool = base.sample(n * oversample, generator=generator)
    logw = reward(pool) / beta
    idx = torch.multinomial(torch.softmax(logw, 0), n, replacement=True, generator=generator)
    return pool[idx]


def euler_sample(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], n: int, steps: int = 100,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Integrate the flow ODE from noise (t=1) to data (t=0)."""
    x = torch.randn(n, 2, generator=generator)
    ts = flow.shifted_sigmas(steps)
    for t, t_next in itertools.pairwise(ts):
        x = x + (t_next - t) * velocity(x, t.expand(n))
    return x


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| (zero iff the distributions are equal)."""
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


class ToyVelocityMLP(torch.nn.Module):
    """A small learned velocity model for the toy, for trainers' tests."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, 2),
        )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x_t, t.reshape(-1, 1).to(x_t)], dim=1))
