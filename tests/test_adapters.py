"""Model adapters against the stock diffusers pipelines, on tiny random-init models (genalign.models.tiny).

Every family (SD3, FLUX with and without distilled guidance, Wan, SD1.5 epsilon / v-prediction, SDXL) must give:
the stock pipeline's latents and images when sampled through genalign.sampling; LoRA that saves in diffusers
format and loads into the stock pipeline with identical outputs; a reference (LoRA disabled) equal to the base
model; loading by family from a saved folder, and clear errors for the wrong family or an empty tokenizer.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from genalign import flow
from genalign.models import (
    FlowAdapter,
    FluxAdapter,
    LoraSpec,
    ModelLoadError,
    SD3Adapter,
    UNetAdapter,
    WanAdapter,
    load_adapter,
    tiny,
)
from genalign.sampling import sample_latents

PROMPTS = ["red circle", "two blue squares"]
GUIDANCE = 2.5
STEPS = 3
SEQ = tiny.T5_MAX_LENGTH


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models on a shared 2-core machine: OpenMP threads waiting on a busy core make each op ~100x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _sd3_dynamic_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = tiny.tiny_sd3_pipeline(with_t5=False)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256)
    return pipe


@dataclass
class Family:
    build: Callable
    adapter_cls: type
    adapter_kw: dict = field(default_factory=dict)
    stock_kw: dict = field(default_factory=dict)  # extra arguments of the stock pipeline's __call__
    latent: tuple = (4, 16, 16)  # one sample's latent shape at height x width (x num_frames)
    height: int = 32
    width: int = 32
    num_frames: int | None = None


FAMILIES = {
    "sd3": Family(tiny.tiny_sd3_pipeline, SD3Adapter, {"max_sequence_length": SEQ}, {"max_sequence_length": SEQ}),
    # Without T5 the adapter feeds one zero T5 token by default (the world's image model is trained so).
    "sd3-no-t5-dynamic-shift": Family(_sd3_dynamic_pipeline, SD3Adapter, {}, {"max_sequence_length": 1}),
    # FluxPipeline: classifier-free guidance is `true_cfg_scale`; `guidance_scale` is the distilled guidance input.
    "flux": Family(tiny.tiny_flux_pipeline, FluxAdapter, {"max_sequence_length": SEQ},
                   {"max_sequence_length": SEQ, "true_cfg_scale": GUIDANCE}),
    "flux-distilled": Family(lambda: tiny.tiny_flux_pipeline(guidance_embeds=True), FluxAdapter,
                             {"max_sequence_length": SEQ, "guidance": 4.0},
                             {"max_sequence_length": SEQ, "true_cfg_scale": GUIDANCE, "guidance_scale": 4.0}),
    "wan": Family(tiny.tiny_wan_pipeline, WanAdapter, {"max_sequence_length": SEQ},
                  {"max_sequence_length": SEQ, "num_frames": 5}, latent=(4, 2, 4, 4), num_frames=5),
    "wan2.2-two-experts": Family(lambda: tiny.tiny_wan_pipeline(two_experts=True), WanAdapter,
                                 {"max_sequence_length": SEQ}, {"max_sequence_length": SEQ, "num_frames": 5},
                                 latent=(4, 2, 4, 4), num_frames=5),
    "wan2.2-expand-timesteps": Family(lambda: tiny.tiny_wan_pipeline(expand_timesteps=True), WanAdapter,
                                      {"max_sequence_length": SEQ}, {"max_sequence_length": SEQ, "num_frames": 5},
                                      latent=(4, 2, 4, 4), num_frames=5),
    "sd": Family(tiny.tiny_unet_pipeline, UNetAdapter),
    "sd-v": Family(lambda: tiny.tiny_unet_pipeline(prediction_type="v_prediction"), UNetAdapter),
    # SDXL's default unconditional input (negative_prompt=None) is all zeros; the adapter encodes "" so.
    "sdxl": Family(lambda: tiny.tiny_unet_pipeline(sdxl=True), UNetAdapter, {}, {"negative_prompt": None}),
}
# One representative per pipeline class for the folder tests.
FOLDER_FAMILIES = ["sd3", "flux", "wan", "sd", "sdxl"]


def make(name: str) -> tuple:
    """(family, a fresh tiny stock pipeline, an adapter over it); the same random weights on every call."""
    fam = FAMILIES[name]
    pipe = fam.build()
    pipe.set_progress_bar_config(disable=True)
    return fam, pipe, fam.adapter_cls(pipe, **fam.adapter_kw)


def noise(adapter: FlowAdapter, fam: Family, n: int = len(PROMPTS), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *adapter.latent_shape(fam.height, fam.width, fam.num_frames)), generator=g)


def run_stock(name: str, pipe, adapter, latents: torch.Tensor, output_type: str):
    """The stock pipeline from the same noise; FLUX's latents are packed on the way in and out."""
    fam = FAMILIES[name]
    if isinstance(adapter, FluxAdapter):
        latents = FluxAdapter.pack(latents)
    kw = {"guidance_scale": GUIDANCE, "negative_prompt": [""] * len(PROMPTS)} | fam.stock_kw
    out = pipe(prompt=PROMPTS, height=fam.height, width=fam.width, num_inference_steps=STEPS,
               latents=latents.clone(), output_type=output_type, **kw)
    out = out.frames if isinstance(adapter, WanAdapter) else out.images
    if output_type == "latent" and isinstance(adapter, FluxAdapter):
        out = FluxAdapter.unpack(out, *adapter.latent_shape(fam.height, fam.width)[1:])
    return torch.as_tensor(out)


def velocity_probe(adapter: FlowAdapter, fam: Family, seed: int = 1) -> torch.Tensor:
    x = noise(adapter, fam, seed=seed)
    with torch.no_grad():
        return adapter.velocity(x, torch.tensor([0.3, 0.8]), adapter.encode_prompt(PROMPTS))


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def scale(a: torch.Tensor) -> float:
    """For tolerances relative to a tensor's size: max(1, max |a|)."""
    return max(1.0, float(a.abs().max()))


# ------------------------------------------------------------------------------------------ import
def test_import_of_models_does_not_import_diffusers():
    code = "import sys, genalign.models; print(sorted(m for m in ('diffusers', 'transformers', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("name", list(FAMILIES))
def test_velocity_has_the_latent_shape_and_depends_on_prompt_and_time(name):
    fam, _, adapter = make(name)
    x = noise(adapter, fam)
    assert tuple(x.shape[1:]) == fam.latent
    cond = adapter.encode_prompt(PROMPTS)
    assert all(v.shape[0] == len(PROMPTS) for v in cond.values())
    with torch.no_grad():
        v = adapter.velocity(x, torch.tensor([0.4, 0.4]), cond)
        first_prompt_twice = adapter.repeat_cond({k: c[:1] for k, c in cond.items()}, 2)
        v_swapped = adapter.velocity(x, torch.tensor([0.4, 0.4]), first_prompt_twice)
        v_later = adapter.velocity(x, torch.tensor([0.7, 0.7]), cond)
    assert v.shape == x.shape and torch.isfinite(v).all()
    assert maxdiff(v[1], v_swapped[1]) > 1e-4  # the second sample's prompt matters
    assert maxdiff(v[0], v_swapped[0]) < 1e-5  # and the first is unchanged
    assert maxdiff(v, v_later) > 1e-4


# ------------------------------------------------------------------------------------------ stock agreement
@pytest.mark.parametrize("name", list(FAMILIES))
def test_sampling_matches_the_stock_pipeline(name):
    """sample_latents (Euler + CFG over adapter.velocity) == the stock pipeline's output from the same noise,
    in latents and in decoded images (so the latent normalisation matches the pipeline's too)."""
    fam, pipe, adapter = make(name)
    x1 = noise(adapter, fam)
    ours = sample_latents(adapter, PROMPTS, num_steps=STEPS, guidance_scale=GUIDANCE, latents=x1.clone(),
                          height=fam.height, width=fam.width, num_frames=fam.num_frames)
    stock = run_stock(name, pipe, adapter, x1, "latent")
    assert ours.shape == stock.shape == x1.shape
    assert maxdiff(ours, x1) > 0.05  # the comparison is between non-trivial results
    assert maxdiff(ours, stock) < 1e-4, maxdiff(ours, stock)

    with torch.no_grad():
        ours_px = (adapter.decode_latents(ours) / 2 + 0.5).clamp(0, 1)
    stock_px = run_stock(name, pipe, adapter, x1, "np")  # (B, H, W, C) images or (B, F, H, W, C) videos
    ours_px = ours_px.movedim(1, -1)
    assert ours_px.shape == stock_px.shape
    assert maxdiff(ours_px, stock_px) < 1e-4


@pytest.mark.parametrize("strength", [0.6, 0.45])
def test_sdedit_from_init_latents_matches_the_stock_img2img_pipeline(strength):
    """sample_latents(init_latents=..., strength=s) == StableDiffusion3Img2ImgPipeline from the same latents and
    noise: the same steps kept (its rounding: 10 steps at 0.45 run 5, at 0.6 run 6), the same noising."""
    from diffusers import StableDiffusion3Img2ImgPipeline

    fam, pipe, adapter = make("sd3")
    steps = 10
    init = noise(adapter, fam, seed=5)
    ours = sample_latents(adapter, PROMPTS, num_steps=steps, guidance_scale=GUIDANCE, latents=noise(adapter, fam),
                          init_latents=init, strength=strength, height=fam.height, width=fam.width)
    stock_pipe = StableDiffusion3Img2ImgPipeline(**pipe.components)
    stock_pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():  # image = normalised latents (the pipeline takes them as they are); noise from the seed
        stock = stock_pipe(prompt=PROMPTS, image=init, strength=strength, num_inference_steps=steps,
                           guidance_scale=GUIDANCE, negative_prompt=[""] * len(PROMPTS), output_type="latent",
                           generator=torch.Generator().manual_seed(0), **fam.stock_kw).images
    assert maxdiff(ours, init) > 0.05 and maxdiff(ours, stock) < 1e-4, maxdiff(ours, stock)
    full = sample_latents(adapter, PROMPTS, num_steps=steps, guidance_scale=GUIDANCE, latents=noise(adapter, fam))
    assert maxdiff(ours, full) > 0.05  # the init latents matter
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="strength"):
            sample_latents(adapter, PROMPTS, num_steps=steps, init_latents=init, strength=bad, latents=noise(adapter, fam))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_unet_velocity_is_the_converted_ddpm_output(prediction_type):
    """One UNet evaluation at an integer DDPM timestep s, converted by hand to v = eps - x0, equals
    adapter.velocity at the flow time with the same noise level."""
    pipe = tiny.tiny_unet_pipeline(prediction_type=prediction_type)
    adapter = UNetAdapter(pipe)
    cond = adapter.encode_prompt(PROMPTS)
    g = torch.Generator().manual_seed(3)
    x_s = torch.randn(2, 4, 16, 16, generator=g)
    ac = pipe.scheduler.alphas_cumprod.double()
    for s in (20, 500, 900):
        a = ac[s]
        with torch.no_grad():
            out = pipe.unet(x_s, s, encoder_hidden_states=cond["prompt_embeds"]).sample.double()
            if prediction_type == "epsilon":
                eps = out
            else:  # v_ddpm = sqrt(a) eps - sqrt(1 - a) x0
                eps = a.sqrt() * out + (1 - a).sqrt() * x_s.double()
            x0 = (x_s.double() - (1 - a).sqrt() * eps) / a.sqrt()
            x_t = (x_s.double() / (a.sqrt() + (1 - a).sqrt())).float()
            t = flow.flow_t_from_alpha_bar(a).expand(2)
            v = adapter.velocity(x_t, t, cond)
        assert abs(float(adapter.ddpm_timestep(t)[0]) - s) < 1e-6
        assert maxdiff(v, eps - x0) < 1e-5 * scale(eps - x0), (s, maxdiff(v, eps - x0))


def test_flux_schedule_follows_the_resolution_dependent_shift():
    """set_schedule reproduces FluxPipeline's mu = calculate_shift(image tokens) and exponential time shift."""
    import math

    _, pipe, adapter = make("flux")
    cfg = pipe.scheduler.config
    sigmas = {}
    for size in (16, 64):
        lat = torch.zeros(1, 4, size, size)
        sched = adapter.sampling_scheduler()
        adapter.set_schedule(sched, 4, lat)
        tokens = (size // 2) ** 2
        mu = cfg.base_shift + (cfg.max_shift - cfg.base_shift) * (tokens - cfg.base_image_seq_len) / (
            cfg.max_image_seq_len - cfg.base_image_seq_len)
        base = torch.linspace(1.0, 1 / 4, 4, dtype=torch.float64)
        expected = math.exp(mu) / (math.exp(mu) + (1 / base - 1))
        assert maxdiff(sched.sigmas[:-1], expected) < 1e-6
        sigmas[size] = sched.sigmas
    assert maxdiff(sigmas[16], sigmas[64]) > 1e-2


def test_flux_packing_matches_the_pipeline_and_inverts():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 6, 8)
    packed = FluxAdapter.pack(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 4, 6, 8))
    assert torch.equal(FluxAdapter.unpack(packed, 6, 8), x)
    assert torch.equal(FluxAdapter.image_ids(6, 8), FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))


@pytest.mark.parametrize("name", ["sd3", "flux", "wan", "sdxl"])
def test_encode_pixels_inverts_decode_latents_normalisation(name):
    """decode_latents(encode_pixels(px)) == the raw VAE round trip, and encode applies the family's constants."""
    _, pipe, adapter = make(name)
    g = torch.Generator().manual_seed(4)
    shape = (1, 3, 5, 32, 32) if name == "wan" else (1, 3, 32, 32)
    px = torch.rand(shape, generator=g) * 2 - 1
    with torch.no_grad():
        raw = pipe.vae.encode(px).latent_dist.mean
        z = adapter.encode_pixels(px)
        cfg = pipe.vae.config
        if name == "wan":
            view = (1, -1, 1, 1, 1)
            expected = (raw - torch.tensor(cfg.latents_mean).view(view)) / torch.tensor(cfg.latents_std).view(view)
        else:
            expected = (raw - (cfg.shift_factor or 0.0)) * cfg.scaling_factor
        assert maxdiff(z, expected) < 1e-6
        assert maxdiff(z, raw) > 1e-2  # the constants are not the identity
        assert maxdiff(adapter.decode_latents(z), pipe.vae.decode(raw).sample) < 1e-5


# ------------------------------------------------------------------------------------------ LoRA
def randomise_lora_b(model: torch.nn.Module, seed: int = 5) -> int:
    """A fresh LoRA is a no-op (B = 0): give every lora_B random values. Returns how many were set."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
                n += 1
    return n


@pytest.mark.parametrize("name", ["sd3", "flux", "wan", "sd", "sdxl"])
def test_lora_saves_in_diffusers_format_and_loads_into_the_stock_pipeline(name, tmp_path):
    fam, _, adapter = make(name)
    v_base = velocity_probe(adapter, fam)

    adapter.add_lora(LoraSpec(rank=4))
    assert randomise_lora_b(adapter.denoiser) > 0
    v_lora = velocity_probe(adapter, fam)
    with adapter.lora_disabled():
        v_off = velocity_probe(adapter, fam)
    assert maxdiff(v_off, v_base) < 1e-6 * scale(v_base)  # the reference is the base model (to float round-off)
    assert maxdiff(v_lora, v_base) > 1e-2  # and the adapter changes the output
    assert maxdiff(velocity_probe(adapter, fam), v_lora) < 1e-7  # re-enabled after the context
    # trainability is left as it was (peft's disable/enable would flip it), and adapters the user switched
    # off stay off after the context
    trainable = {n for n, p in adapter.denoiser.named_parameters() if p.requires_grad}
    with adapter.lora_disabled():
        assert {n for n, p in adapter.denoiser.named_parameters() if p.requires_grad} == trainable
    adapter.denoiser.disable_adapters()
    with adapter.lora_disabled():
        pass
    assert maxdiff(velocity_probe(adapter, fam), v_base) < 1e-6 * scale(v_base)
    adapter.denoiser.enable_adapters()

    adapter.save_lora(tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()

    _, stock, _ = make(name)  # the same random base weights
    stock.load_lora_weights(str(tmp_path / "lora"))
    loaded = fam.adapter_cls(stock, **fam.adapter_kw)
    assert maxdiff(velocity_probe(loaded, fam), v_lora) < 1e-5
    with loaded.lora_disabled():
        assert maxdiff(velocity_probe(loaded, fam), v_base) < 1e-6 * scale(v_base)

    _, _, again = make(name)
    again.load_lora(tmp_path / "lora", adapter_name="trained")
    assert maxdiff(velocity_probe(again, fam), v_lora) < 1e-5


# ------------------------------------------------------------------------------------------ loading
@pytest.fixture(scope="module")
def saved_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    folders, probes = {}, {}
    for name in FOLDER_FAMILIES:
        fam, pipe, adapter = make(name)
        pipe.save_pretrained(root / name, safe_serialization=True)
        folders[name], probes[name] = root / name, velocity_probe(adapter, fam)
    return folders, probes


@pytest.mark.parametrize("name", FOLDER_FAMILIES)
def test_load_adapter_picks_the_family_from_model_index(name, saved_folders):
    folders, probes = saved_folders
    fam = FAMILIES[name]
    adapter = load_adapter(folders[name], **fam.adapter_kw)
    assert type(adapter) is fam.adapter_cls
    assert maxdiff(velocity_probe(adapter, fam), probes[name]) < 1e-6


@pytest.mark.parametrize("name", FOLDER_FAMILIES)
def test_text_encoders_built_empty_give_the_same_model_fingerprint(name, saved_folders):
    """text_encoders="empty" (training on a latent cache): the encoders are meta-device shells, never loaded, yet
    the cache's model fingerprint (their configs, and two tensors each read from the files) is the loaded one's."""
    from genalign.data.cache import model_fingerprint

    folders, _ = saved_folders
    fam = FAMILIES[name]
    loaded = load_adapter(folders[name], **fam.adapter_kw)
    empty = load_adapter(folders[name], text_encoders="empty", **fam.adapter_kw)
    assert empty.text_encoders() and all(p.is_meta for m in empty.text_encoders() for p in m.parameters())
    assert model_fingerprint(empty) == model_fingerprint(loaded)
    with pytest.raises(RuntimeError, match="built empty"):
        empty.encode_prompt(["red circle"])
    assert empty.release_text_encoders() == sum(p.numel() for m in loaded.text_encoders() for p in m.parameters())


def test_weights_are_read_from_sharded_files_and_under_a_tied_alias(tmp_path):
    """`first_and_last_parameters` of an empty encoder reads a sharded checkpoint (model.safetensors.index.json),
    and a tied weight saved under its other name (T5's shared / encoder.embed_tokens); a missing one is named."""
    from safetensors.torch import load_file, save_file

    from genalign.models.base import (
        empty_text_encoders,
        first_and_last_parameters,
        read_safetensors_tensors,
        tied_weight_aliases,
    )

    pipe = tiny.tiny_sd3_pipeline(with_t5=True)
    t5 = pipe.text_encoder_3
    pipe.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "text_encoder_3" / "model.safetensors.index.json").is_file()
    empty = empty_text_encoders(tmp_path / "sharded")["text_encoder_3"]
    named = dict(t5.named_parameters())
    names = list(named)
    first, last = names[0], names[-1]
    got = first_and_last_parameters(empty)
    assert torch.equal(got[0], named[first]) and torch.equal(got[1], named[last])
    # an encoder with only a variant's files (model.fp16.safetensors.index.json, ...) is left to load as usual
    clip = tmp_path / "sharded" / "text_encoder"
    (clip / "model.safetensors.index.json").rename(clip / "model.fp16.safetensors.index.json")
    assert set(empty_text_encoders(tmp_path / "sharded")) == {"text_encoder_2", "text_encoder_3"}

    single = tmp_path / "single"
    single.mkdir()
    state = {k: v.contiguous() for k, v in t5.state_dict().items() if k != "shared.weight"}
    state["encoder.embed_tokens.weight"] = t5.shared.weight.detach().clone()
    save_file(state, single / "model.safetensors")
    assert "shared.weight" not in load_file(single / "model.safetensors")
    aliased = read_safetensors_tensors(single, ["shared.weight"], aliases=tied_weight_aliases(t5))
    assert torch.equal(aliased[0], t5.shared.weight)
    with pytest.raises(ModelLoadError, match="no tensor 'shared.weight'"):
        read_safetensors_tensors(single, ["shared.weight"])


def test_wrong_family_folder_is_refused_with_its_name(saved_folders):
    folders, _ = saved_folders
    for cls in (SD3Adapter, FluxAdapter, WanAdapter, UNetAdapter):
        for name, folder in folders.items():
            if FAMILIES[name].adapter_cls is cls:
                continue
            with pytest.raises(ModelLoadError) as err:
                cls.from_pretrained(folder)
            assert str(folder) in str(err.value) and cls.family in str(err.value)


def test_unsupported_pipeline_class_is_refused(tmp_path):
    folder = tmp_path / "kandinsky-model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ModelLoadError, match="kandinsky-model.*KandinskyPipeline"):
        load_adapter(folder)
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_adapter(tmp_path)


def test_empty_tokenizer_is_refused(saved_folders, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    folders, _ = saved_folders
    folder = tmp_path / "sd-broken-tokenizer"
    shutil.copytree(folders["sd"], folder)
    shutil.rmtree(folder / "tokenizer")
    empty = Tokenizer(models.WordLevel(vocab={"<|pad|>": 0, "<|unk|>": 1}, unk_token="<|unk|>"))
    PreTrainedTokenizerFast(tokenizer_object=empty, unk_token="<|unk|>", pad_token="<|pad|>").save_pretrained(
        folder / "tokenizer")
    with pytest.raises(ModelLoadError, match=r"sd-broken-tokenizer.*tokenizer has only 2 tokens"):
        load_adapter(folder)


def test_sd3_folder_saved_without_t5_loads_with_load_adapter(tmp_path):
    """The world's image model has no T5 (model_index.json: "text_encoder_3": [null, null])."""
    from genalign.models import SD3Adapter, load_adapter
    from genalign.models.tiny import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline(with_t5=False)
    pipe.save_pretrained(tmp_path)
    adapter = load_adapter(tmp_path)
    assert isinstance(adapter, SD3Adapter) and adapter.pipe.text_encoder_3 is None
    assert adapter.max_sequence_length == 1
    cond = adapter.encode_prompt(["red circle"])
    x = torch.randn(1, *adapter.latent_shape(32, 32))
    t = torch.tensor([0.5])
    expected = SD3Adapter(pipe).velocity(x, t, SD3Adapter(pipe).encode_prompt(["red circle"]))
    assert torch.allclose(adapter.velocity(x, t, cond), expected, atol=1e-6)
