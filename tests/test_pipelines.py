"""genalign.pipelines: RLG / Flow-NRG diffusers pipelines on tiny random-init models of every family.

With guidance off the call is the stock call (bit-identical); RLG at w = 0 / w = 1 is the stock pipeline without /
with the LoRA; the mixed-adapter batch equals sequential passes; the combined model output (seen by the callback)
equals the hand formula; bad input fails before the first denoising step; the diffusers API keeps working.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from diffusers import (
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    WanPipeline,
)
from genalign.pipelines import (
    RLGFluxPipeline,
    RLGStableDiffusion3Pipeline,
    RLGStableDiffusionPipeline,
    RLGStableDiffusionXLPipeline,
    RLGWanPipeline,
    guided_pipeline_class,
)

from genalign.guidance import (
    BASE,
    GuidanceError,
    LatentRewardConfig,
    LatentRewardModel,
    latent_space_id,
)
from genalign.guidance.lora import adapter_state
from genalign.models import FluxAdapter, LoraSpec, SD3Adapter, UNetAdapter, WanAdapter, load_adapter, tiny
from genalign.sampling import cfg_velocity

PROMPTS = ["red circle", "two blue squares"]
SEQ = tiny.T5_MAX_LENGTH
STEPS = 3


@dataclass
class Family:
    build: Callable
    cls: type
    stock: type
    adapter_cls: type
    call_kw: dict = field(default_factory=dict)
    adapter_kw: dict = field(default_factory=dict)
    num_frames: int | None = None


FAMILIES = {
    "sd3": Family(tiny.tiny_sd3_pipeline, RLGStableDiffusion3Pipeline, StableDiffusion3Pipeline, SD3Adapter,
                  {"guidance_scale": 2.5, "max_sequence_length": SEQ}, {"max_sequence_length": SEQ}),
    "flux": Family(tiny.tiny_flux_pipeline, RLGFluxPipeline, FluxPipeline, FluxAdapter,
                   {"true_cfg_scale": 2.5, "negative_prompt": ["", ""], "max_sequence_length": SEQ},
                   {"max_sequence_length": SEQ}),
    "wan": Family(tiny.tiny_wan_pipeline, RLGWanPipeline, WanPipeline, WanAdapter,
                  {"guidance_scale": 2.5, "max_sequence_length": SEQ, "num_frames": 5}, {"max_sequence_length": SEQ},
                  num_frames=5),
    "sd": Family(tiny.tiny_unet_pipeline, RLGStableDiffusionPipeline, StableDiffusionPipeline, UNetAdapter,
                 {"guidance_scale": 2.5}),
    "sdxl": Family(lambda: tiny.tiny_unet_pipeline(sdxl=True), RLGStableDiffusionXLPipeline,
                   StableDiffusionXLPipeline, UNetAdapter, {"guidance_scale": 2.5}),
    "flux-distilled": Family(lambda: tiny.tiny_flux_pipeline(guidance_embeds=True), RLGFluxPipeline, FluxPipeline,
                             FluxAdapter, {"guidance_scale": 4.0, "max_sequence_length": SEQ},
                             {"max_sequence_length": SEQ}),
    # Wan 2.2 A14B: two transformers split by noise level; the LoRA sits on the high-noise one only.
    "wan2.2-two-experts": Family(lambda: tiny.tiny_wan_pipeline(two_experts=True), RLGWanPipeline, WanPipeline,
                                 WanAdapter, {"guidance_scale": 2.5, "max_sequence_length": SEQ, "num_frames": 5},
                                 {"max_sequence_length": SEQ}, num_frames=5),
}
FLOW = ["sd3", "flux", "wan"]


def make(name: str, lora: str | None = "dpo", seed: int = 0):
    """(family, the RLG pipeline, the stock pipeline sharing its components, a genalign adapter); with a LoRA
    whose B is random (a fresh LoRA is a no-op)."""
    fam = FAMILIES[name]
    torch.manual_seed(0)
    pipe = fam.cls.from_pipe(fam.build())
    pipe.set_progress_bar_config(disable=True)
    adapter = fam.adapter_cls(pipe, **fam.adapter_kw)
    if lora:
        adapter.add_lora(LoraSpec(rank=4, adapter_name=lora))
        randomise_lora(adapter.denoiser, lora, seed)
    stock = fam.stock.from_pipe(pipe)
    stock.set_progress_bar_config(disable=True)
    return fam, pipe, stock, adapter


def randomise_lora(model, name: str, seed: int, std: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_B" in n and f".{name}." in n:
            p.data.normal_(0, std, generator=g)


def run(fam: Family, pipe, output_type: str = "latent", steps: int = STEPS, **kw):
    out = pipe(prompt=PROMPTS, height=32, width=32, num_inference_steps=steps, output_type=output_type,
               generator=torch.Generator().manual_seed(7), **(fam.call_kw | kw))
    return torch.as_tensor(out.frames if hasattr(out, "frames") else out.images)


def maxdiff(a, b) -> float:
    return float((torch.as_tensor(a).float() - torch.as_tensor(b).float()).abs().max())


class Counter:
    """Counts forwards (and rows) of a submodule every denoiser pass goes through."""

    def __init__(self, module):
        self.rows: list[int] = []
        self.handle = module.register_forward_pre_hook(lambda m, args, kwargs: self.rows.append(
            int((args[0] if args else next(iter(kwargs.values()))).shape[0])), with_kwargs=True)


def pass_probe(pipe):
    """A submodule each denoiser forward calls once, with the forward's batch."""
    den = pipe.transformer if hasattr(pipe, "transformer") and pipe.transformer is not None else pipe.unet
    for name in ("x_embedder", "patch_embedding", "conv_in", "pos_embed"):
        if hasattr(den, name):
            return Counter(getattr(den, name))
    raise AssertionError("no probe")


# ------------------------------------------------------------------------------------------- stock agreement
@pytest.mark.parametrize("name", list(FAMILIES))
def test_guidance_off_is_the_stock_pipeline(name):
    fam, pipe, stock, _ = make(name, lora=None)
    for output_type in ("latent", "np"):
        ours, theirs = run(fam, pipe, output_type), run(fam, stock, output_type)
        assert torch.equal(ours, theirs), maxdiff(ours, theirs)
    assert pipe.last_guidance_stats is None


@pytest.mark.parametrize("name", list(FAMILIES))
def test_rlg_weight_0_and_1_are_the_stock_pipeline_without_and_with_the_lora(name):
    fam, pipe, stock, adapter = make(name)
    ft = run(fam, stock)
    with adapter.lora_disabled():
        base = run(fam, stock)
    assert maxdiff(ft, base) > 1e-3  # the LoRA changes the output
    probe = pass_probe(pipe)  # on the denoiser both pipelines share
    run(fam, stock)
    stock_rows = list(probe.rows)
    for kw, want in (({"rlg_scale": 1.0}, ft), ({"rlg_experts": {"dpo": 0.0}}, base), ({"rlg_scale": 0.0}, base)):
        probe.rows.clear()
        assert torch.equal(run(fam, pipe, **kw), want), kw
        # zero-weight passes are skipped: one denoiser pass per stock call, with the stock batch
        assert probe.rows == stock_rows


@pytest.mark.parametrize("name", list(FAMILIES))
def test_rlg_mixed_adapter_batch_equals_sequential_and_changes_the_output(name):
    fam, pipe, stock, _ = make(name)
    ft = run(fam, stock)
    probe = pass_probe(pipe)
    mixed = run(fam, pipe, rlg_scale=1.6)
    stats_mixed, rows_mixed = pipe.last_guidance_stats, list(probe.rows)
    probe.rows.clear()
    seq = run(fam, pipe, rlg_scale=1.6, rlg_mixed_batch=False)
    stats_seq = pipe.last_guidance_stats
    assert stats_mixed["mixed_batch"] and not stats_seq["mixed_batch"]
    assert maxdiff(mixed, seq) < 1e-5 * max(1.0, float(seq.abs().max()))
    assert maxdiff(mixed, ft) > 1e-3  # extrapolation moves away from the fine-tuned output
    # one forward per denoiser call with twice the rows, vs two forwards
    assert stats_mixed["forwards"] == stats_mixed["calls"] and stats_seq["forwards"] == 2 * stats_seq["calls"]
    assert sum(rows_mixed) == sum(probe.rows) and len(rows_mixed) * 2 == len(probe.rows)


def _capture():
    seen = {"noise_pred": [], "latents": []}

    def callback(pipe, i, t, kw):
        seen["noise_pred"].append(kw["noise_pred"].clone())
        seen["latents"].append(kw["latents"].clone())
        return {}

    return seen, {"callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": ["latents", "noise_pred"]}


def _unpacked(name, x):
    return FluxAdapter.unpack(x, 16, 16) if name == "flux" else x


def _step_state(name, pipe, seen, step):
    """(x_t, t) at denoising step `step` (> 0), rebuilt from the callback's latents after step - 1."""
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    FAMILIES[name].adapter_cls(pipe, **FAMILIES[name].adapter_kw).set_schedule(sched, STEPS, torch.zeros(1, 4, 16, 16))
    t = float(sched.sigmas[step])
    return _unpacked(name, seen["latents"][step - 1]), torch.full((2,), t)


@pytest.mark.parametrize("name", FLOW)
def test_combined_output_seen_by_the_callback_is_the_multi_expert_formula(name):
    fam, pipe, _, adapter = make(name)
    adapter.add_lora(LoraSpec(rank=4, adapter_name="style"))
    randomise_lora(adapter.denoiser, "style", 11)
    pipe.transformer.set_adapter(["dpo"])
    seen, cb = _capture()
    run(fam, pipe, rlg_experts={"dpo": 1.4, "style": 0.6}, **cb)
    x, t = _step_state(name, pipe, seen, 1)
    cond = adapter.encode_prompt(PROMPTS)
    uncond = adapter.encode_prompt(["", ""])
    g = fam.call_kw.get("guidance_scale", fam.call_kw.get("true_cfg_scale"))
    v = {}
    for p in (BASE, "dpo", "style"):
        with adapter_state([adapter.denoiser], p), torch.no_grad():
            v[p] = cfg_velocity(adapter, x, t, cond, uncond, g)
    hand = v[BASE] + 1.4 * (v["dpo"] - v[BASE]) + 0.6 * (v["style"] - v[BASE])
    got = _unpacked(name, seen["noise_pred"][1])
    assert maxdiff(got, hand) < 1e-4 * max(1.0, float(hand.abs().max()))


def test_rlg_window_uses_the_fine_tuned_model_outside():
    fam, pipe, stock, _ = make("sd3")
    probe = pass_probe(pipe)
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(4)
    ts = [float(s) for s in sched.sigmas[:-1]]  # flow t of each step: 1.0, 0.9, 0.75, 0.5 (shift 3)
    run(fam, pipe, steps=4, rlg_scale=1.6, rlg_window=(0.0, 0.8), rlg_mixed_batch=False)
    inside = [t <= 0.8 for t in ts]
    assert inside == [False, False, True, True]
    # sequential: outside = one CFG pass (the fine-tuned model), inside = base + fine-tuned
    assert len(probe.rows) == sum(2 if i else 1 for i in inside)
    # a window covering everything is plain RLG; one covering nothing is the fine-tuned model
    assert torch.equal(run(fam, pipe, rlg_scale=1.6, rlg_window=(0.0, 1.0)), run(fam, pipe, rlg_scale=1.6))
    assert torch.equal(run(fam, pipe, rlg_scale=1.6, rlg_window=(0.0, 0.0)), run(fam, stock))


def test_rlg_reference_for_a_fully_fine_tuned_denoiser():
    fam, pipe, stock, _ = make("sd3", lora=None)
    import copy

    reference = copy.deepcopy(pipe.transformer)
    base = run(fam, stock)
    with torch.no_grad():
        for p in pipe.transformer.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ft = run(fam, stock)
    assert torch.equal(run(fam, pipe, rlg_scale=0.0, rlg_reference=reference), base)
    assert torch.equal(run(fam, pipe, rlg_scale=1.0, rlg_reference=reference), ft)
    assert maxdiff(run(fam, pipe, rlg_scale=1.5, rlg_reference=reference), ft) > 1e-4


# ------------------------------------------------------------------------------------------- NRG
def _reward_for(name, adapter, shape):
    key = "prompt_embeds" if name == "wan" else "pooled_prompt_embeds"
    dim = adapter.encode_prompt(["a"])[key].shape[-1]
    torch.manual_seed(3)
    return LatentRewardModel(LatentRewardConfig(latent_space=latent_space_id(adapter), latent_shape=shape, hidden=16,
                                                depth=2, cond_key=key, cond_dim=dim)).eval()


@pytest.mark.parametrize("name", FLOW)
def test_nrg_adds_the_hand_computed_reward_gradient_after_cfg(name):
    fam, pipe, _, adapter = make(name, lora=None)
    shape = adapter.latent_shape(32, 32, fam.num_frames)
    reward = _reward_for(name, adapter, shape)
    weights = {"VQ": 0.5, "MQ": 0.5, "TA": 0.0}
    seen, cb = _capture()
    run(fam, pipe, nrg_reward_model=reward, nrg_weights=weights, nrg_scale=3.0, **cb)
    assert pipe.last_guidance_stats["nrg_evals"] == STEPS  # once per step, also with two calls per step
    x, t = _step_state(name, pipe, seen, 1)
    cond, uncond = adapter.encode_prompt(PROMPTS), adapter.encode_prompt(["", ""])
    g = fam.call_kw.get("guidance_scale", fam.call_kw.get("true_cfg_scale"))
    with torch.no_grad():
        v_cfg = cfg_velocity(adapter, x, t, cond, uncond, g)
    xg = x.clone().requires_grad_(True)
    scores = reward(xg, t, cond)
    (grad,) = torch.autograd.grad((0.5 * scores["VQ"] + 0.5 * scores["MQ"]).sum(), xg)
    factor = min(float(t[0]) / (1 - float(t[0])), 10.0)
    hand = v_cfg - 3.0 * factor * grad
    got = _unpacked(name, seen["noise_pred"][1])
    assert maxdiff(got, hand) < 1e-4 * max(1.0, float(hand.abs().max()))
    assert maxdiff(got, v_cfg) > 1e-3


def test_nrg_window_rlg_together_and_zero_scale():
    fam, pipe, stock, adapter = make("sd3")
    reward = _reward_for("sd3", adapter, adapter.latent_shape(32, 32))
    out = run(fam, pipe, steps=4, nrg_reward_model=reward, nrg_window=(0.0, 0.8))
    assert pipe.last_guidance_stats["nrg_evals"] == 2  # t = 0.75 and 0.5 of 1.0, 0.9, 0.75, 0.5
    assert maxdiff(out, run(fam, stock, steps=4)) > 1e-4
    both = run(fam, pipe, rlg_scale=1.5, nrg_reward_model=reward, nrg_scale=2.0)
    assert pipe.last_guidance_stats["mixed_batch"] and pipe.last_guidance_stats["nrg_evals"] == STEPS
    assert maxdiff(both, run(fam, pipe, rlg_scale=1.5)) > 1e-4
    assert torch.equal(run(fam, pipe, nrg_reward_model=reward, nrg_scale=0.0), run(fam, stock))


# ------------------------------------------------------------------------------------------- errors
class Spy:
    """Counts calls of the denoiser and the first text encoder."""

    def __init__(self, pipe):
        den = pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet
        self.calls = 0
        den.register_forward_pre_hook(self.hook)
        pipe.text_encoder.register_forward_pre_hook(self.hook)

    def hook(self, *args):
        self.calls += 1


@pytest.mark.parametrize("kwargs, match", [
    ({"rlg_scale": 3.5}, r"outside the allowed range \[0.0, 3.0\]"),
    ({"rlg_scale": -0.5}, "outside the allowed range"),
    ({"rlg_experts": {"dpo": 1.0, "missing": 1.0}}, r"\['missing'\] are not loaded"),
    ({"rlg_scale": 1.5, "rlg_experts": {"dpo": 1.0}}, "not both"),
    ({"rlg_scale": 1.5, "rlg_window": (0.2, 1.2)}, "rlg_window"),
    ({"rlg_window": (0.2, 0.8)}, "without rlg_scale"),
    ({"rlg_scale": 1.5, "rlg_mixed_batch": "yes"}, "rlg_mixed_batch"),
    ({"nrg_weights": {"VQ": 1.0}}, "without nrg_reward_model"),
])
def test_bad_rlg_input_fails_before_any_work(kwargs, match):
    fam, pipe, _, _ = make("sd3")
    spy = Spy(pipe)
    with pytest.raises(GuidanceError, match=match):
        run(fam, pipe, **kwargs)
    assert spy.calls == 0


def test_rlg_scale_without_a_lora_and_fused_lora_are_refused():
    fam, pipe, _, _ = make("sd3", lora=None)
    with pytest.raises(GuidanceError, match="needs a fine-tuned model"):
        run(fam, pipe, rlg_scale=1.5)
    fam, pipe, _, _ = make("sd", lora="dpo")
    pipe.fuse_lora()
    with pytest.raises(GuidanceError, match="unfuse_lora"):
        run(fam, pipe, rlg_scale=1.5)


def test_bad_nrg_input_fails_before_any_work():
    fam, pipe, _, adapter = make("sd3", lora=None)
    shape = adapter.latent_shape(32, 32)
    reward = _reward_for("sd3", adapter, shape)
    spy = Spy(pipe)
    with pytest.raises(GuidanceError, match=r"dimension\(s\) \['AQ'\]"):
        run(fam, pipe, nrg_reward_model=reward, nrg_weights={"VQ": 1.0, "AQ": 1.0})
    with pytest.raises(GuidanceError, match="nrg_scale"):
        run(fam, pipe, nrg_reward_model=reward, nrg_scale=-1.0)
    with pytest.raises(GuidanceError, match=r"shape \(4, 16, 16\).*\(4, 32, 32\)"):
        pipe(prompt=PROMPTS, height=64, width=64, num_inference_steps=2, nrg_reward_model=reward,
             **fam.call_kw)
    flux_adapter = FluxAdapter(tiny.tiny_flux_pipeline())
    other = _reward_for("flux", flux_adapter, shape)
    with pytest.raises(GuidanceError, match="latent space"):
        run(fam, pipe, nrg_reward_model=other)
    assert spy.calls == 0
    sd_fam, sd_pipe, _, _ = make("sd", lora=None)
    with pytest.raises(GuidanceError, match="flow-matching pipeline"):
        run(sd_fam, sd_pipe, nrg_reward_model=reward)


# ------------------------------------------------------------------------------------------- diffusers API
def test_diffusers_api_keeps_working(tmp_path):
    fam, pipe, stock, adapter = make("sd3")
    # return_dict=False and output types
    out = pipe(prompt=PROMPTS, height=32, width=32, num_inference_steps=2, output_type="np", return_dict=False,
               rlg_scale=1.5, generator=torch.Generator().manual_seed(0), **fam.call_kw)
    assert isinstance(out, tuple) and out[0].shape == (2, 32, 32, 3)
    pil = pipe(prompt=PROMPTS[0], height=32, width=32, num_inference_steps=2, rlg_scale=1.5, **fam.call_kw)
    assert pil.images[0].size == (32, 32)
    # save_pretrained writes a stock folder: genalign's loader and the stock class read it
    adapter.save_lora(tmp_path / "lora", adapter_name="dpo")
    _, fresh, _, _ = make("sd3", lora=None)
    fresh.save_pretrained(tmp_path / "pipe")
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    assert isinstance(load_adapter(tmp_path / "pipe"), SD3Adapter)
    loaded = RLGStableDiffusion3Pipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    # load_lora_weights (diffusers format) + an expert by adapter name == the in-memory LoRA
    loaded.load_lora_weights(str(tmp_path / "lora"), adapter_name="dpo")
    assert maxdiff(run(fam, loaded, rlg_experts={"dpo": 1.5}), run(fam, pipe, rlg_experts={"dpo": 1.5})) < 1e-5
    # from_pipe both ways, and the guided class for a stock pipeline
    assert guided_pipeline_class(stock) is RLGStableDiffusion3Pipeline
    assert type(StableDiffusion3Pipeline.from_pipe(pipe)) is StableDiffusion3Pipeline
    # the user's LoRA state is left as it was
    assert pipe.get_active_adapters() == ["dpo"]
