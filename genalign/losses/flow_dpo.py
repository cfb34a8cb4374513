"""Flow-DPO and its f-divergence family: pure loss functions over per-sample flow-matching errors.

Flow-DPO (Liu et al., "Improving Video Generation with Human Feedback", arXiv 2501.13918), in the notation of
ALGORITHMS.md section 1. For a pair (prompt c, winner x^w, loser x^l) noised with the SAME eps and t, and
`D_m(x) = mean over latent elements of (v - v_m(x_t, t, c))^2` for model m (theta = trained, ref = reference):

    z    = -(beta_t / 2) * [ (D_theta(x^w) - D_ref(x^w)) - (D_theta(x^l) - D_ref(x^l)) ]
    loss = -log sigmoid(z)

beta convention: beta multiplies HALF the difference of errors, as written above (the public SD3.5-M
implementation uses beta = 100 in this convention; Diffusion-DPO code bases that write `-beta * diff` need
half our beta for the same loss). `beta_t = beta` (constant, the default: the paper's Table 4 shows that
`beta_t = beta (1 - t)^2`, the literal carry-over of Diffusion-DPO, reward-hacks) or `beta * (1 - t)^2`.

Soft labels: `label` is the probability that the first item (w) is preferred; the loss is the binary cross
entropy `-(label log sigmoid(z) + (1 - label) log sigmoid(-z))`. label 1 is the loss above; label 0.5 (a tie
kept with tie_policy "half") is the symmetric loss, minimised at z = 0 (no preference learned).

f-divergences (f-DPO, Wang et al., arXiv 2309.16240), ALGORITHMS.md 1a: with the per-sample implicit reward
`l(x) = -(D_theta(x) - D_ref(x))` and `u = exp((beta_t / 2) l(x))` (the surrogate for pi / pi_ref),

    z = f'(u_w) - f'(u_l)

reverse KL `f'(u) = log u + 1` is Flow-DPO exactly; forward KL `f'(u) = -1/u`; Jensen-Shannon
`f'(u) = log(2u / (1 + u))`; alpha-divergence `f'(u) = (1 - u^(-alpha)) / alpha`, 0 < alpha < 1.
Everything is computed from `log u`, never from `u`, so that large errors do not overflow an exp before the
divergence needs it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BETA_SCHEDULES = ("constant", "one_minus_t_sq")
DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements of each sample (everything but dim 0), in float32: shape (B,)."""
    diff = pred.float() - target.float()
    return diff.pow(2).reshape(diff.shape[0], -1).mean(dim=1)


def beta_at(beta: float, t: torch.Tensor | None, schedule: str = "constant") -> torch.Tensor | float:
    """beta_t: `beta` ("constant") or `beta * (1 - t)^2` ("one_minus_t_sq", needs the per-sample t)."""
    if schedule == "constant":
        return beta
    if schedule == "one_minus_t_sq":
        if t is None:
            raise ValueError("beta_schedule='one_minus_t_sq' needs the per-sample timesteps t")
        return beta * (1 - t) ** 2
    raise ValueError(f"unknown beta_schedule {schedule!r} (one of {', '.join(BETA_SCHEDULES)})")


def f_prime_of_log_ratio(log_u: torch.Tensor, divergence: str, alpha: float = 0.5) -> torch.Tensor:
    """f'(u) for u = exp(log_u), evaluated from log_u (ALGORITHMS.md 1a)."""
    if divergence == "reverse_kl":
        return log_u + 1
    if divergence == "forward_kl":
        return -torch.exp(-log_u)
    if divergence == "js":
        # log(2u / (1 + u)) = log 2 + log u - log(1 + u),  log(1 + u) = softplus(log u)
        return math.log(2.0) + log_u - F.softplus(log_u)
    if divergence == "alpha":
        if not 0 < alpha < 1:
            raise ValueError(f"the alpha-divergence needs 0 < alpha < 1, got {alpha}")
        return (1 - torch.exp(-alpha * log_u)) / alpha
    raise ValueError(f"unknown divergence {divergence!r} (one of {', '.join(DIVERGENCES)})")


def flow_dpo_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
    t: torch.Tensor | None = None,
    beta_schedule: str = "constant",
    label: torch.Tensor | float | None = None,
    divergence: str | None = None,
    alpha: float = 0.5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Flow-DPO loss (arXiv 2501.13918) from per-sample errors, all of shape (B,).

    model_err_* / ref_err_*: `per_sample_mse(v_pred, v_target)` of the trained and the reference model for the
    winners (w) and losers (l), computed with shared noise and t. The reference errors should carry no gradient.
    beta: see the module docstring for the convention (beta multiplies half the error difference).
    t: per-sample timesteps, needed by beta_schedule="one_minus_t_sq".
    label: probability that w is preferred, per sample or scalar (None = 1: w wins; 0.5: a tie).
    divergence: None (plain Flow-DPO) or one of "reverse_kl" (identical to Flow-DPO), "forward_kl", "js",
    "alpha" (with `alpha`), the f-DPO family.

    Returns (mean loss, stats). stats holds detached tensors: `losses` and `z` per sample, `implicit_acc` (share of
    decided pairs ranked as labelled; NaN when the batch has only ties), `model_minus_ref_w` and
    `model_minus_ref_l` (means of D_theta - D_ref; training should push the winners' below the losers'),
    `z_mean`, `z_std`.
    """
    dtype = torch.promote_types(model_err_w.dtype, torch.float32)  # half inputs are computed in float32
    beta_t = beta_at(beta, t, beta_schedule)
    if isinstance(beta_t, torch.Tensor):
        beta_t = beta_t.to(dtype)
    diff_w = model_err_w.to(dtype) - ref_err_w.to(dtype)  # D_theta(x^w) - D_ref(x^w)
    diff_l = model_err_l.to(dtype) - ref_err_l.to(dtype)
    if divergence is None:
        z = -(beta_t / 2) * (diff_w - diff_l)
    else:
        # log u = (beta_t / 2) * l(x) with l(x) = -(D_theta(x) - D_ref(x))
        log_u_w = -(beta_t / 2) * diff_w
        log_u_l = -(beta_t / 2) * diff_l
        z = f_prime_of_log_ratio(log_u_w, divergence, alpha) - f_prime_of_log_ratio(log_u_l, divergence, alpha)

    if label is None:
        label = torch.ones_like(z)
    label = torch.as_tensor(label, dtype=z.dtype, device=z.device).expand_as(z)
    losses = -(label * F.logsigmoid(z) + (1 - label) * F.logsigmoid(-z))

    with torch.no_grad():
        decided = label != 0.5
        correct = torch.where(label > 0.5, z > 0, z < 0)
        acc = correct[decided].float().mean() if decided.any() else torch.tensor(float("nan"))
        stats = {
            "losses": losses.detach(),
            "z": z.detach(),
            "z_mean": z.detach().mean(),
            "z_std": z.detach().std(unbiased=False),
            "implicit_acc": acc,
            "model_minus_ref_w": diff_w.detach().mean(),
            "model_minus_ref_l": diff_l.detach().mean(),
        }
    return losses.mean(), stats
