"""Flow-DPO and f-DPO losses (genalign.losses) against independent formulas (ALGORITHMS.md 1, 1a)."""

import math

import pytest
import torch

from genalign.losses import beta_at, f_prime_of_log_ratio, flow_dpo_loss, per_sample_mse


def errors(n=64, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(4, n, generator=g, dtype=dtype) + 0.5  # MSE-like positive values around 1
    noise = 0.01 * torch.randn(4, n, generator=g, dtype=dtype)  # model and reference differ a little
    mw, ml = base[0] + noise[0], base[1] + noise[1]
    return mw, ml, base[0], base[1]


def reference_loss(mw, ml, rw, rl, beta, label=1.0, beta_t=None):
    """Per-sample formula written out in plain Python floats."""
    out = []
    for i in range(len(mw)):
        b = beta if beta_t is None else beta_t[i]
        z = -(b / 2) * ((mw[i] - rw[i]) - (ml[i] - rl[i]))
        lab = label if isinstance(label, float) else float(label[i])
        # -(label log sigmoid(z) + (1 - label) log sigmoid(-z)), log sigmoid(z) = -log(1 + exp(-z))
        out.append(lab * math.log1p(math.exp(-z)) + (1 - lab) * math.log1p(math.exp(z)))
    return sum(out) / len(out)


def test_per_sample_mse_is_the_mean_over_every_latent_element():
    pred, target = torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6)
    want = torch.stack([((pred[i] - target[i]) ** 2).sum() / (4 * 5 * 6) for i in range(3)])
    assert torch.allclose(per_sample_mse(pred, target), want, atol=1e-6)
    assert per_sample_mse(pred, target).shape == (3,)


def test_flow_dpo_loss_matches_the_formula_and_its_stats():
    mw, ml, rw, rl = (x.tolist() for x in errors())
    loss, stats = flow_dpo_loss(*(torch.tensor(x, dtype=torch.float64) for x in (mw, ml, rw, rl)), beta=100.0)
    assert loss.item() == pytest.approx(reference_loss(mw, ml, rw, rl, 100.0), rel=1e-10)
    z = [-(50.0) * ((mw[i] - rw[i]) - (ml[i] - rl[i])) for i in range(len(mw))]
    assert stats["z"].tolist() == pytest.approx(z, rel=1e-9)
    assert stats["implicit_acc"].item() == pytest.approx(sum(v > 0 for v in z) / len(z))
    assert 0.0 < stats["implicit_acc"].item() < 1.0  # the random data has both signs: the check can fail
    assert stats["model_minus_ref_w"].item() == pytest.approx(sum(a - b for a, b in zip(mw, rw)) / len(mw))
    assert stats["model_minus_ref_l"].item() == pytest.approx(sum(a - b for a, b in zip(ml, rl)) / len(ml))


def test_lowering_the_winner_error_lowers_the_loss():
    mw, ml, rw, rl = errors()
    mw.requires_grad_(True)
    ml.requires_grad_(True)
    loss, _ = flow_dpo_loss(mw, ml, rw, rl, beta=100.0)
    loss.backward()
    assert (mw.grad > 0).all() and (ml.grad < 0).all()


def test_equal_model_and_reference_give_log_2():
    mw, ml, _, _ = errors()
    loss, stats = flow_dpo_loss(mw, ml, mw.clone(), ml.clone(), beta=1000.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert stats["z"].abs().max().item() == 0.0


def test_label_zero_is_the_swapped_pair():
    mw, ml, rw, rl = errors()
    swapped, _ = flow_dpo_loss(ml, mw, rl, rw, beta=30.0)
    labelled, stats = flow_dpo_loss(mw, ml, rw, rl, beta=30.0, label=0.0)
    assert labelled.item() == pytest.approx(swapped.item(), rel=1e-12)
    assert stats["implicit_acc"].item() == pytest.approx((stats["z"] < 0).double().mean().item())


def test_ties_use_the_symmetric_half_loss():
    mw, ml, rw, rl = errors()
    label = torch.tensor([1.0, 0.5] * 32, dtype=torch.float64)
    loss, stats = flow_dpo_loss(mw, ml, rw, rl, beta=80.0, label=label)
    assert loss.item() == pytest.approx(reference_loss(mw.tolist(), ml.tolist(), rw.tolist(), rl.tolist(), 80.0,
                                                       label=label), rel=1e-10)
    z = stats["z"]
    tie_losses = stats["losses"][label == 0.5]
    want = 0.5 * (torch.nn.functional.softplus(-z) + torch.nn.functional.softplus(z))[label == 0.5]
    assert torch.allclose(tie_losses, want, atol=1e-12)
    # implicit accuracy counts only the decided pairs
    assert stats["implicit_acc"].item() == pytest.approx((z[label == 1.0] > 0).double().mean().item())
    # a tie is minimised by no preference (z = 0, loss log 2), not by either side winning
    mw0 = mw.clone().requires_grad_(True)
    tie_loss, _ = flow_dpo_loss(mw0, ml, mw.clone(), ml.clone(), beta=80.0, label=0.5)
    tie_loss.backward()
    assert tie_loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert mw0.grad.abs().max().item() < 1e-15
    _, only_ties = flow_dpo_loss(mw, ml, rw, rl, beta=1.0, label=0.5)
    assert math.isnan(only_ties["implicit_acc"].item())


def test_beta_schedule_one_minus_t_squared():
    mw, ml, rw, rl = errors()
    t = torch.linspace(0.01, 0.99, len(mw), dtype=torch.float64)
    loss, stats = flow_dpo_loss(mw, ml, rw, rl, beta=200.0, t=t, beta_schedule="one_minus_t_sq")
    beta_t = (200.0 * (1 - t) ** 2).tolist()
    assert loss.item() == pytest.approx(reference_loss(mw.tolist(), ml.tolist(), rw.tolist(), rl.tolist(), 200.0,
                                                       beta_t=beta_t), rel=1e-10)
    const, const_stats = flow_dpo_loss(mw, ml, rw, rl, beta=200.0, t=t)  # constant ignores t
    assert torch.allclose(stats["z"], const_stats["z"] * (1 - t) ** 2, atol=1e-12)
    assert const.item() != pytest.approx(loss.item())
    with pytest.raises(ValueError, match="needs the per-sample timesteps"):
        beta_at(1.0, None, "one_minus_t_sq")
    with pytest.raises(ValueError, match="unknown beta_schedule"):
        flow_dpo_loss(mw, ml, rw, rl, beta=1.0, beta_schedule="linear")


@pytest.mark.parametrize("schedule", ["constant", "one_minus_t_sq"])
def test_reverse_kl_f_divergence_is_flow_dpo(schedule):
    mw, ml, rw, rl = errors(seed=3)
    t = torch.rand(len(mw), dtype=torch.float64)
    label = torch.tensor([1.0, 0.5, 0.0, 1.0] * 16, dtype=torch.float64)
    plain, plain_stats = flow_dpo_loss(mw, ml, rw, rl, beta=150.0, t=t, beta_schedule=schedule, label=label)
    fdpo, fdpo_stats = flow_dpo_loss(mw, ml, rw, rl, beta=150.0, t=t, beta_schedule=schedule, label=label,
                                     divergence="reverse_kl")
    # f'(u) = log u + 1: the +1 cancels between winner and loser, leaving exactly Flow-DPO's z
    assert torch.allclose(fdpo_stats["z"], plain_stats["z"], rtol=0, atol=1e-12)
    assert abs(fdpo.item() - plain.item()) < 1e-12


def test_other_f_divergences_against_u_written_out():
    mw, ml, rw, rl = errors(seed=5)
    beta = 60.0
    u_w = torch.exp((beta / 2) * -(mw - rw))  # u = exp((beta/2) l), l = -(D_theta - D_ref)
    u_l = torch.exp((beta / 2) * -(ml - rl))
    alpha = 0.3
    want = {
        "forward_kl": (-1 / u_w) - (-1 / u_l),
        "js": torch.log(2 * u_w / (1 + u_w)) - torch.log(2 * u_l / (1 + u_l)),
        "alpha": (1 - u_w ** (-alpha)) / alpha - (1 - u_l ** (-alpha)) / alpha,
    }
    for name, z in want.items():
        loss, stats = flow_dpo_loss(mw, ml, rw, rl, beta=beta, divergence=name, alpha=alpha)
        assert torch.allclose(stats["z"], z, atol=1e-10), name
        assert loss.item() == pytest.approx(torch.nn.functional.softplus(-z).mean().item(), rel=1e-10), name
    # the alpha-divergence tends to reverse KL as alpha -> 0
    _, rkl = flow_dpo_loss(mw, ml, rw, rl, beta=beta)
    _, small_alpha = flow_dpo_loss(mw, ml, rw, rl, beta=beta, divergence="alpha", alpha=1e-7)
    assert torch.allclose(small_alpha["z"], rkl["z"], atol=1e-5)
    with pytest.raises(ValueError, match="unknown divergence"):
        f_prime_of_log_ratio(torch.zeros(1), "hellinger")
    with pytest.raises(ValueError, match="0 < alpha < 1"):
        f_prime_of_log_ratio(torch.zeros(1), "alpha", alpha=1.5)


def test_js_is_stable_for_large_log_ratios():
    log_u = torch.tensor([-800.0, 0.0, 800.0], dtype=torch.float64)
    out = f_prime_of_log_ratio(log_u, "js")
    assert torch.isfinite(out).all()
    assert out[2].item() == pytest.approx(math.log(2), abs=1e-12)  # log(2u/(1+u)) -> log 2 as u -> inf
