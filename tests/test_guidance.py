"""genalign.guidance: the RLG and Flow-NRG math against hand formulas, the 2-D toy theory check, peft
mixed-adapter batches against sequential passes, the adapter-level combiners, and latent reward models
(interface, checkpoints refusing other latent spaces, the tie-aware pair loss)."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from genalign import flow
from genalign.guidance import (
    BASE,
    GuidanceError,
    LatentRewardConfig,
    LatentRewardLoadError,
    LatentRewardModel,
    NRGSettings,
    RLGPlan,
    cfg,
    check_compatible,
    check_weight,
    combine,
    expert_weights_at,
    latent_space_id,
    nrg_correction,
    nrg_factor,
    pair_loss,
    pass_weights,
    rlg_combine,
    rlg_combiner,
    rlg_velocity,
)
from genalign.guidance.lora import adapter_state, mixed_adapter_batch
from genalign.models import LoraSpec, SD3Adapter, tiny
from genalign.sampling import cfg_velocity, sample_latents
from genalign.world.toy2d import GaussianMixture2D, energy_distance, euler_sample

SEQ = tiny.T5_MAX_LENGTH
PROMPTS = ["red circle", "two blue squares"]


def maxdiff(a, b) -> float:
    return float((torch.as_tensor(a).detach().float() - torch.as_tensor(b).detach().float()).abs().max())


# ------------------------------------------------------------------------------------------- RLG math
def test_cfg_and_rlg_match_the_hand_formulas():
    g = torch.Generator().manual_seed(0)
    u_b, c_b, u_f, c_f, u_2, c_2 = (torch.randn(3, 4, generator=g) for _ in range(6))
    scale, w = 4.5, 1.6
    v_base = u_b + scale * (c_b - u_b)
    v_ft = u_f + scale * (c_f - u_f)
    assert torch.allclose(cfg(u_b, c_b, scale), v_base)
    assert torch.allclose(rlg_combine(v_base, v_ft, w), v_base + w * (v_ft - v_base))
    assert torch.allclose(rlg_combine(v_base, v_ft, w), (1 - w) * v_base + w * v_ft, atol=1e-6)
    # multi-expert: v_base + sum_k w_k (v_k - v_base), and the pass-weight form used by the samplers
    v_2 = cfg(u_2, c_2, scale)
    hand = v_base + 0.7 * (v_ft - v_base) + 0.9 * (v_2 - v_base)
    assert torch.allclose(rlg_combine(v_base, {"a": v_ft, "b": v_2}, {"a": 0.7, "b": 0.9}), hand, atol=1e-6)
    a = pass_weights({"a": 0.7, "b": 0.9})
    assert a[BASE] == pytest.approx(1 - 1.6) and sum(a.values()) == pytest.approx(1.0)
    assert torch.allclose(combine({BASE: v_base, "a": v_ft, "b": v_2}, a), hand, atol=1e-5)
    # RLG commutes with CFG (what the per-denoiser-call combination relies on)
    per_call = cfg(rlg_combine(u_b, u_f, w), rlg_combine(c_b, c_f, w), scale)
    assert torch.allclose(per_call, rlg_combine(v_base, v_ft, w), atol=1e-5)


def test_rlg_weights_outside_the_documented_range_are_refused():
    assert check_weight("w", 0.0) == 0.0 and check_weight("w", 3.0) == 3.0
    for bad in (-0.1, 3.01, float("nan"), float("inf"), "x"):
        with pytest.raises(GuidanceError, match="w"):
            check_weight("w", bad)
    with pytest.raises(GuidanceError, match="rlg_window"):
        RLGPlan.build([torch.nn.Linear(2, 2)], scale=1.0, window=(0.5, 1.5))


def test_window_falls_back_to_the_fine_tuned_model_outside():
    w = {"a": 1.5}
    assert expert_weights_at(0.5, w, (0.2, 0.8)) == {"a": 1.5}
    assert expert_weights_at(0.9, w, (0.2, 0.8)) == {"a": 1.0}  # outside: plain fine-tuned
    assert pass_weights(expert_weights_at(0.9, w, (0.2, 0.8)))[BASE] == 0.0  # so the base is skipped
    two = expert_weights_at(0.1, {"a": 1.2, "b": 0.4}, (0.2, 0.8))
    assert two == pytest.approx({"a": 0.75, "b": 0.25})
    assert expert_weights_at(0.1, {"a": 0.0}, (0.2, 0.8)) == {"a": 0.0}  # all-zero stays the base
    assert expert_weights_at(0.9, w, None) == w  # no window: RLG everywhere (the public behaviour)


def test_rlg_velocity_skips_zero_weight_passes_and_is_exact_at_0_and_1():
    calls = {"base": 0, "ft": 0}

    def counted(name, fn):
        def v(x, t):
            calls[name] += 1
            return fn(x, t)
        return v

    base = counted("base", lambda x, t: x * 2.0)
    ft = counted("ft", lambda x, t: x - 1.0)
    x, t = torch.randn(5, 2), torch.full((5,), 0.5)
    assert torch.equal(rlg_velocity(base, {"ft": ft}, {"ft": 0.0})(x, t), x * 2.0)
    assert calls == {"base": 1, "ft": 0}
    assert torch.equal(rlg_velocity(base, {"ft": ft}, {"ft": 1.0})(x, t), x - 1.0)
    assert calls == {"base": 1, "ft": 1}
    out = rlg_velocity(base, {"ft": ft}, {"ft": 1.6}, window=(0.0, 0.4))(x, t)  # t = 0.5: outside -> ft
    assert torch.equal(out, x - 1.0) and calls == {"base": 1, "ft": 2}
    out = rlg_velocity(base, {"ft": ft}, {"ft": 1.6}, window=(0.0, 0.6))(x, t)
    assert torch.allclose(out, 2 * x + 1.6 * (x - 1.0 - 2 * x)) and calls == {"base": 2, "ft": 3}


@pytest.mark.parametrize("w", [0.5, 1.5, 2.0])
def test_toy_rlg_with_weight_w_lands_on_the_optimum_for_beta_over_w(w):
    """ALGORITHMS.md 4: with the exact tilted optimum for beta as the fine-tuned model, RLG with weight w (no CFG)
    approximates the optimum for beta / w: closer to it than to the optima for beta / w * 0.5 and * 2.

    A moderate tilt (beta = 3): for strong tilts (beta = 1 here) and w = 2 the trajectory-level approximation
    overshoots to about beta / (2 w) (measured), as the paper's 'exact at t = 0 only' predicts."""
    base, direction, beta = GaussianMixture2D.default(), torch.tensor([1.0, 0.5]), 3.0
    ft = base.tilted_linear(direction, beta)
    v = rlg_velocity(base.velocity, {"ft": ft.velocity}, {"ft": w})
    xs = euler_sample(v, 2000, steps=50, generator=torch.Generator().manual_seed(1))
    dist = {m: energy_distance(xs, base.tilted_linear(direction, beta / w * m).sample(
        2000, generator=torch.Generator().manual_seed(2))) for m in (0.5, 1.0, 2.0)}
    assert dist[1.0] < 0.5 * min(dist[0.5], dist[2.0]), dist


# ------------------------------------------------------------------------------------------- NRG math
class QuadraticReward(torch.nn.Module):
    """r_VQ = -|x - m|^2 * (1 + t), r_TA = sum(a * x): gradients known in closed form."""

    dims = ("VQ", "TA")
    latent_space = "toy"
    latent_shape = (2,)
    conditioning = "none"

    def __init__(self):
        super().__init__()
        self.m = torch.nn.Parameter(torch.tensor([0.5, -1.0]))
        self.a = torch.tensor([2.0, 3.0])

    def forward(self, x, t, cond=None):
        return {"VQ": -((x - self.m) ** 2).sum(1) * (1 + t), "TA": (x * self.a).sum(1)}


def test_nrg_correction_equals_the_hand_computed_gradient_term():
    reward = QuadraticReward()
    x = torch.randn(4, 2)
    t = torch.full((4,), 0.6)
    s = NRGSettings.build(reward.dims, {"VQ": 0.5, "TA": 0.25}, scale=2.0)
    grad = 0.5 * (-2 * (x - reward.m.detach()) * 1.6) + 0.25 * reward.a
    hand = -2.0 * (0.6 / 0.4) * grad
    with torch.no_grad():  # as inside a diffusers __call__
        got = nrg_correction(reward, x, t, None, s)
    assert torch.allclose(got, hand, atol=1e-5)
    assert reward.m.grad is None  # only x_t is differentiated


def test_nrg_factor_is_clipped_and_the_window_and_zero_scale_switch_it_off():
    assert float(nrg_factor(torch.tensor(0.5))) == pytest.approx(1.0)
    assert float(nrg_factor(torch.tensor(0.99), 10.0)) == 10.0
    assert float(nrg_factor(torch.tensor(1.0), 7.0)) == 7.0  # t = 1 gives the clip, not inf
    reward, x = QuadraticReward(), torch.randn(3, 2)
    s = NRGSettings.build(reward.dims, {"TA": 1.0}, scale=1.0, max_factor=4.0)
    got = nrg_correction(reward, x, torch.full((3,), 1.0), None, s)
    assert torch.allclose(got, -4.0 * reward.a.expand(3, 2))
    s_win = NRGSettings.build(reward.dims, {"TA": 1.0}, window=(0.0, 0.5))
    assert nrg_correction(reward, x, torch.full((3,), 0.7), None, s_win) is None
    assert nrg_correction(reward, x, torch.full((3,), 0.3), None, s_win) is not None
    assert nrg_correction(reward, x, torch.full((3,), 0.3), None, NRGSettings.build(reward.dims, scale=0.0)) is None


def test_nrg_settings_refuse_bad_input():
    dims = ("VQ", "MQ", "TA")
    assert NRGSettings.build(dims).weights == pytest.approx({d: 1 / 3 for d in dims})
    with pytest.raises(GuidanceError, match="'XX'"):
        NRGSettings.build(dims, {"VQ": 1.0, "XX": 1.0})
    with pytest.raises(GuidanceError, match="nrg_scale"):
        NRGSettings.build(dims, scale=-1.0)
    with pytest.raises(GuidanceError, match="not finite"):
        NRGSettings.build(dims, {"VQ": float("nan")})
    with pytest.raises(GuidanceError, match="nrg_window"):
        NRGSettings.build(dims, window=(-0.1, 0.5))


# ------------------------------------------------------------------------------------------- LoRA passes
@pytest.fixture(scope="module")
def sd3_two_loras():
    """A tiny SD3 adapter with two trained-looking LoRAs "a" and "b" (random B: a fresh LoRA is a no-op)."""
    torch.manual_seed(0)
    pipe = tiny.tiny_sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    adapter = SD3Adapter(pipe, max_sequence_length=SEQ)
    g = torch.Generator().manual_seed(3)
    for name in ("a", "b"):
        adapter.add_lora(LoraSpec(rank=4, adapter_name=name))
    for n, p in adapter.denoiser.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.3, generator=g)
    adapter.denoiser.set_adapter(["a"])
    adapter.denoiser.eval()
    return adapter


def _velocity_of(adapter, name, x, t, cond):
    with adapter_state([adapter.denoiser], name), torch.no_grad():
        return adapter.velocity(x, t, cond)


@pytest.mark.parametrize("row_slices", [True, False], ids=["row-slices", "peft-adapter-names"])
@pytest.mark.parametrize("order", ["blocks", "interleaved"])
def test_mixed_adapter_batch_equals_sequential_passes(sd3_two_loras, row_slices, order):
    ad = sd3_two_loras
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([0.7, 0.7])
    cond = ad.encode_prompt(PROMPTS)
    seq = {n: _velocity_of(ad, n, x, t, cond) for n in (BASE, "a", "b")}
    assert maxdiff(seq[BASE], seq["a"]) > 1e-3 and maxdiff(seq["a"], seq["b"]) > 1e-3  # the LoRAs do something
    # rows in pass blocks (what RLG builds) or alternating (runs of one row each)
    names = [n for n in (BASE, "a", "b") for _ in range(2)] if order == "blocks" else [BASE, "a", "b", "b", "a", BASE]
    rows = [0, 1] * 3
    xs, ts = x[rows], t[rows]
    conds = {k: v[rows] for k, v in cond.items()}
    with mixed_adapter_batch([ad.denoiser], names, row_slices=row_slices), torch.no_grad():
        mixed = ad.velocity(xs, ts, conds)
    for i, (name, r) in enumerate(zip(names, rows)):
        assert maxdiff(mixed[i], seq[name][r]) < 1e-5, (i, name)
    # the user's adapter state is restored afterwards and a plain forward is the active adapter again
    assert ad.denoiser.active_adapters() == ["a"]
    with torch.no_grad():
        assert maxdiff(ad.velocity(x, t, cond), seq["a"]) < 1e-6


def test_row_sliced_mixed_batch_covers_plain_lora_layers_and_keeps_gradients(sd3_two_loras):
    """Every plain LoRA Linear of the SD3 transformer takes the row-slice path; under autograd the output is
    differentiable with respect to the input rows, with the same gradient as the sequential pass."""
    from genalign.guidance.lora import MixedBatchHooks, lora_layers, row_runs

    ad = sd3_two_loras
    layers = lora_layers([ad.denoiser])
    hooks = MixedBatchHooks(layers)
    assert hooks.sliced and not hooks.named
    assert row_runs([BASE, BASE, "a", "a", "b", BASE]) == [("a", 2, 4), ("b", 4, 5)]
    x = torch.randn(1, 4, 16, 16)
    t = torch.tensor([0.5])
    cond = ad.encode_prompt(PROMPTS[:1])
    xs = x.repeat(2, 1, 1, 1).requires_grad_(True)
    with mixed_adapter_batch([ad.denoiser], [BASE, "b"]):
        ad.velocity(xs, t.repeat(2), ad.cat_cond([cond, cond]))[1].square().sum().backward()
    xb = x.clone().requires_grad_(True)
    with adapter_state([ad.denoiser], "b"):
        ad.velocity(xb, t, cond).square().sum().backward()
    assert float(xs.grad[0].abs().max()) == 0.0  # the base row does not enter row 1
    assert maxdiff(xs.grad[1], xb.grad[0]) < 1e-5


def test_row_sliced_mixed_batch_on_conv_lora_layers():
    """LoRA on Conv2d layers (UNet families) takes the same path and matches the sequential passes."""
    from peft import LoraConfig, inject_adapter_in_model

    from genalign.guidance.lora import MixedBatchHooks, lora_layers

    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 3, 1))
    net = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0", "2"]), net, adapter_name="a")
    for n, p in net.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.3, generator=g)
    net.eval()
    assert len(MixedBatchHooks(lora_layers([net])).sliced) == 2
    x = torch.randn(2, 3, 8, 8, generator=g)
    with torch.no_grad():
        with adapter_state([net], BASE):
            base = net(x)
        with adapter_state([net], "a"):
            lora = net(x)
        assert maxdiff(base, lora) > 1e-3
        with mixed_adapter_batch([net], [BASE, BASE, "a", "a"]):
            mixed = net(torch.cat([x, x]))
    assert maxdiff(mixed[:2], base) < 1e-6 and maxdiff(mixed[2:], lora) < 1e-6


def test_rlg_combiner_multi_expert_formula_zero_skips_and_both_paths(sd3_two_loras):
    """Adapter-level combiner: CFG on each model, then the multi-expert formula; one forward in a mixed batch,
    one per model sequentially; passes of weight 0 are not evaluated."""
    ad = sd3_two_loras
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([0.6, 0.6])
    cond, uncond = ad.encode_prompt(PROMPTS), ad.encode_prompt(["", ""])
    g = 3.0

    def cfg_of(name):
        with adapter_state([ad.denoiser], name), torch.no_grad():
            return cfg_velocity(ad, x, t, cond, uncond, g)

    v = {n: cfg_of(n) for n in (BASE, "a", "b")}
    hand = v[BASE] + 1.2 * (v["a"] - v[BASE]) + 0.5 * (v["b"] - v[BASE])
    outs = {}
    for mixed in (True, False):
        comb = rlg_combiner(ad, guidance_scale=g, experts={"a": 1.2, "b": 0.5}, mixed_batch=mixed)
        with torch.no_grad():
            outs[mixed] = comb(x, t, cond, uncond)
        assert comb.guided.stats["forwards"] == (1 if mixed else 3)
        assert comb.guided.stats["rows"] == 3 * 2 * 2  # passes x CFG halves x batch
    assert maxdiff(outs[True], hand) < 1e-4 and maxdiff(outs[False], hand) < 1e-4
    assert maxdiff(outs[True], outs[False]) < 1e-5
    # w = 0: only the base runs, exactly; w = 1: only the expert, exactly
    for w, want in ((0.0, v[BASE]), (1.0, v["b"])):
        comb = rlg_combiner(ad, guidance_scale=g, experts={"b": w})
        with torch.no_grad():
            assert torch.equal(comb(x, t, cond, uncond), want)
        assert comb.guided.stats["rows"] == 2 * 2
    with pytest.raises(GuidanceError, match="not loaded"):
        rlg_combiner(ad, guidance_scale=g, experts={"nope": 1.0})


def test_rlg_combiner_drives_sample_latents(sd3_two_loras):
    ad = sd3_two_loras
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    kw = {"num_steps": 2, "guidance_scale": 2.0, "latents": noise}
    ft = sample_latents(ad, PROMPTS, **kw)  # "a" active
    with ad.lora_disabled():
        base = sample_latents(ad, PROMPTS, **kw)
    assert torch.equal(sample_latents(ad, PROMPTS, combiner=rlg_combiner(ad, guidance_scale=2.0, scale=1.0), **kw), ft)
    assert torch.equal(sample_latents(ad, PROMPTS, combiner=rlg_combiner(ad, guidance_scale=2.0, scale=0.0), **kw),
                       base)
    ex = sample_latents(ad, PROMPTS, combiner=rlg_combiner(ad, guidance_scale=2.0, scale=1.5), **kw)
    assert maxdiff(ex, ft) > 1e-3 and maxdiff(ex, base) > maxdiff(ft, base)


# ------------------------------------------------------------------------------------------- latent rewards
@pytest.fixture(scope="module")
def sd3_adapter():
    pipe = tiny.tiny_sd3_pipeline()
    return SD3Adapter(pipe, max_sequence_length=SEQ)


@pytest.mark.parametrize("trunk", ["conv", "mlp", "transformer"])
def test_latent_reward_model_saves_loads_and_is_differentiable(trunk, sd3_adapter, tmp_path):
    ad = sd3_adapter
    space, shape = latent_space_id(ad), ad.latent_shape(32, 32)
    if trunk == "transformer":
        model = LatentRewardModel.from_transformer(ad.denoiser, 1, latent_space=space, latent_shape=shape, hidden=16)
        first = "transformer_blocks.0.attn.to_q.weight"
        assert torch.equal(model.trunk.state_dict()[first], ad.denoiser.state_dict()[first])
        assert len(model.trunk.transformer_blocks) == 1
    else:
        model = LatentRewardModel(LatentRewardConfig(latent_space=space, latent_shape=shape, trunk=trunk, hidden=16,
                                                     depth=2, cond_dim=64))
    model.eval()
    x, t = torch.randn(2, *shape), torch.tensor([0.3, 0.9])
    cond = ad.encode_prompt(PROMPTS)
    scores = model(x, t, cond)
    assert set(scores) == {"VQ", "MQ", "TA"} and all(s.shape == (2,) for s in scores.values())
    assert maxdiff(scores["VQ"], model(x, torch.tensor([0.8, 0.1]), cond)["VQ"]) > 0  # noise-aware: t matters
    s = NRGSettings.build(model.dims, {"VQ": 1.0})
    with torch.no_grad():
        corr = nrg_correction(model, x, t, cond, s)
    assert corr.shape == x.shape and corr.abs().sum() > 0
    model.save_pretrained(tmp_path / "r")
    loaded = LatentRewardModel.from_pretrained(tmp_path / "r", latent_space=space, latent_shape=shape)
    for k in scores:
        assert torch.allclose(loaded(x, t, cond)[k], scores[k], atol=1e-6)


def test_latent_reward_for_another_latent_space_or_resolution_is_refused(sd3_adapter, tmp_path):
    ad = sd3_adapter
    space, shape = latent_space_id(ad), ad.latent_shape(32, 32)
    flux_space = latent_space_id(__import__("genalign.models", fromlist=["FluxAdapter"]).FluxAdapter(
        tiny.tiny_flux_pipeline()))
    assert flux_space != space  # same VAE class, other normalisation constants
    model = LatentRewardModel(LatentRewardConfig(latent_space=space, latent_shape=shape, hidden=8, depth=1))
    model.save_pretrained(tmp_path / "r")
    with pytest.raises(LatentRewardLoadError, match="latent space"):
        LatentRewardModel.from_pretrained(tmp_path / "r", latent_space=flux_space)
    with pytest.raises(LatentRewardLoadError, match="shape"):
        LatentRewardModel.from_pretrained(tmp_path / "r", latent_space=space, latent_shape=(4, 32, 32))
    with pytest.raises(GuidanceError, match="latent space"):
        check_compatible(model, flux_space, shape)
    with pytest.raises(LatentRewardLoadError, match="genalign_latent_reward.json"):
        LatentRewardModel.from_pretrained(tmp_path)


class _Spy(torch.nn.Module):
    dims = ("VQ", "TA")

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.seen = None

    def forward(self, x, t, cond=None):
        self.seen = (x.detach(), t.detach())
        s = self.w * x.flatten(1).mean(1)
        return {"VQ": s, "TA": -s}


def test_pair_loss_noises_both_items_with_the_same_t_and_noise():
    spy = _Spy()
    x_a, x_b = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    loss, stats = pair_loss(spy, x_a, x_b, torch.tensor([1.0, 0.0, 0.5]), generator=torch.Generator().manual_seed(0))
    x_t, t = spy.seen
    t_a, t_b = t[:3], t[3:]
    assert torch.equal(t_a, t_b) and torch.equal(t_a, stats["t"])
    # shared noise: x_t(A) - x_t(B) = (1 - t) (x0_A - x0_B) exactly
    assert torch.allclose(x_t[:3] - x_t[3:], flow._bcast(1 - t_a, x_a) * (x_a - x_b), atol=1e-5)
    loss.backward()
    assert spy.w.grad is not None and torch.isfinite(loss)
    # ties: identical items give delta 0 and exactly the BTT tie loss -log((theta^2 - 1) / (theta + 1)^2)
    tie, _ = pair_loss(spy, x_a, x_a, torch.full((3,), 0.5), theta=5.0)
    assert float(tie) == pytest.approx(-math.log(24 / 36), rel=1e-5)
    bt, _ = pair_loss(spy, x_a, x_b, {"VQ": torch.ones(3), "TA": torch.zeros(3)}, loss="bt")
    assert torch.isfinite(bt)


def test_auto_mixed_batch_is_chosen_by_layer_kind_and_size_on_cuda_only(sd3_two_loras):
    plan = RLGPlan.build([sd3_two_loras.denoiser], experts={"a": 1.5})
    assert plan.mixed and plan.auto

    class Sample:  # what use_mixed reads of the denoiser's input
        def __init__(self, per_sample: int, is_cuda: bool):
            self.is_cuda, self._n = is_cuda, per_sample

        def __getitem__(self, i):
            return torch.empty(self._n)

    from genalign.guidance.denoiser import MIXED_BATCH_AUTO_MAX_ELEMENTS as limit

    # plain LoRA layers: the row-sliced mixed batch, measured faster than sequential passes at 512 and 1024 px
    assert plan.row_sliced
    assert plan.use_mixed(Sample(16 * 64 * 64, True)) and plan.use_mixed(Sample(16 * 128 * 128, True))
    # a layer on peft's adapter_names path (DoRA, say): mixed only up to the size where that path was faster
    peft_path = dataclasses.replace(plan, row_sliced=False)
    assert peft_path.use_mixed(Sample(16 * 64 * 64, True))  # SD3 512 px: measured faster mixed
    assert not peft_path.use_mixed(Sample(16 * 128 * 128, True))  # 1024 px: measured faster sequential
    assert peft_path.use_mixed(Sample(4 * limit, False))  # CPU: always mixed
    from peft import LoraConfig

    with_dora = copy.deepcopy(sd3_two_loras.denoiser)
    with_dora.add_adapter(LoraConfig(r=2, use_dora=True, target_modules=["proj_out"]), adapter_name="d")
    dora_plan = RLGPlan.build([with_dora], experts={"a": 1.5, "d": 0.5})
    assert not dora_plan.row_sliced and not dora_plan.mixed  # peft refuses DoRA in a mixed batch: sequential
    assert not dora_plan.use_mixed(Sample(16 * 64 * 64, True))
    forced = RLGPlan.build([sd3_two_loras.denoiser], experts={"a": 1.5}, mixed_batch=True)
    assert forced.use_mixed(Sample(16 * 128 * 128, True))
    assert not RLGPlan.build([sd3_two_loras.denoiser], experts={"a": 1.5}, mixed_batch=False).use_mixed(
        Sample(10, False))


def test_nrg_combiner_adds_the_correction_and_refuses_other_latents(sd3_adapter):
    from genalign.guidance import nrg_combiner

    ad = sd3_adapter
    shape = ad.latent_shape(32, 32)
    torch.manual_seed(0)
    reward = LatentRewardModel(LatentRewardConfig(latent_space=latent_space_id(ad), latent_shape=shape, hidden=8,
                                                  depth=1, cond_dim=64)).eval()
    x, t = torch.randn(2, *shape), torch.full((2,), 0.4)
    cond, uncond = ad.encode_prompt(PROMPTS), ad.encode_prompt(["", ""])
    comb = nrg_combiner(ad, reward, guidance_scale=2.0, weights={"TA": 1.0}, scale=1.5)
    with torch.no_grad():
        got = comb(x, t, cond, uncond)
        v = cfg_velocity(ad, x, t, cond, uncond, 2.0)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(reward(xg, t, cond)["TA"].sum(), xg)
    assert maxdiff(got, v - 1.5 * (0.4 / 0.6) * grad) < 1e-5
    with pytest.raises(GuidanceError, match="shape"):
        nrg_combiner(ad, reward, guidance_scale=2.0)(torch.randn(2, 4, 8, 8), t, cond, uncond)


def test_mixed_batch_falls_back_to_sequential_when_a_lora_layer_sees_other_rows():
    """A LoRA layer applied to a tensor without the batch's rows (here a learned query shared by all rows) cannot
    be split by rows: the mixed batch raises MixedBatchMismatch and the denoiser evaluates the passes one by one,
    with the sequential result."""
    from peft import LoraConfig, inject_adapter_in_model

    from genalign.guidance.denoiser import DenoiserSpec, GuidedDenoiser, RLGPlan
    from genalign.guidance.lora import MixedBatchMismatch

    class SharedQuery(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.query = torch.nn.Parameter(torch.randn(1, 8))
            self.proj = torch.nn.Linear(8, 8)
            self.out = torch.nn.Linear(8, 8)

        def forward(self, hidden_states, timestep):
            return self.out(hidden_states) + self.proj(self.query)  # proj sees 1 row, whatever the batch

    g = torch.Generator().manual_seed(0)
    net = inject_adapter_in_model(LoraConfig(r=2, target_modules=["proj", "out"]), SharedQuery(), adapter_name="a")
    for n, p in net.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.5, generator=g)
    net.eval()
    x = torch.randn(3, 8, generator=g)
    with pytest.raises(MixedBatchMismatch), mixed_adapter_batch([net], [BASE] * 3 + ["a"] * 3), torch.no_grad():
        net(x.repeat(2, 1), None)
    with torch.no_grad():
        with adapter_state([net], BASE):
            base = net(x, None)
        lora = net(x, None)
    spec = DenoiserSpec("toy", "hidden_states", lambda ts: 0.5)
    guided = GuidedDenoiser([net], spec, rlg=RLGPlan.build([net], scale=1.5, mixed_batch=True))
    with guided.installed(), torch.no_grad(), pytest.warns(UserWarning, match="evaluating RLG passes sequentially"):
        out = net(hidden_states=x, timestep=torch.zeros(3))
    assert maxdiff(out, base + 1.5 * (lora - base)) < 1e-5
    assert not guided.rlg.mixed and guided.rlg.mixed_reason.startswith("runtime:")
