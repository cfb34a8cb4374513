"""`genalign world build` end to end at a tiny budget: every stage writes a loadable diffusers pipeline folder."""

import json

import numpy as np
import pytest
import torch

from genalign.world.build import BuildConfig, build_world

TINY = BuildConfig(image_corpus=128, video_corpus=16, vae_steps=3, image_steps=3, video_steps=3, batch_size=8)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    build_world(out, TINY)
    return out


def test_build_writes_every_stage_and_its_timing(built):
    report = json.loads((built / "BUILD.json").read_text())
    assert set(report) == {"vae", "image", "video"}
    assert report["image"]["config"]["image_steps"] == 3 and report["image"]["stats"]["seconds"] > 0
    assert not list(built.glob("*.tmp"))


def test_built_image_model_loads_in_the_stock_pipeline(built):
    from diffusers import StableDiffusion3Pipeline

    from genalign.models import SD3Adapter, load_adapter
    from genalign.sampling import sample_latents

    pipe = StableDiffusion3Pipeline.from_pretrained(built / "image-base", text_encoder_3=None, tokenizer_3=None)
    adapter = load_adapter(built / "image-base")
    assert isinstance(adapter, SD3Adapter)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ours = sample_latents(adapter, ["red circle"], num_steps=2, guidance_scale=3.0, latents=noise.clone())
    stock = pipe(prompt="red circle", num_inference_steps=2, guidance_scale=3.0, height=32, width=32,
                 latents=noise.clone(), output_type="latent", max_sequence_length=1).images
    assert torch.allclose(ours, stock, atol=1e-5)
    assert json.loads((built / "image-base" / "genalign_sampling.json").read_text())["guidance_scale"] > 1


def test_built_video_model_loads_in_a_fresh_process(built):
    """diffusers imports no custom module by itself: load_adapter must import the world's video VAE class."""
    import subprocess
    import sys

    code = ("from genalign.models import load_adapter; "
            f"a = load_adapter({str(built / 'video-base')!r}, max_sequence_length=16); print(type(a.pipe.vae).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("FramewiseAutoencoderKL")
    # diffusers' type check would warn on every load that a Wan VAE was expected: the world's VAE is one by design
    assert "Expected types for vae" not in out.stderr


def test_quiet_type_warnings_drops_only_the_named_components_type_warning():
    import logging

    from genalign.models.base import quiet_type_warnings

    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.WARNING)  # whatever DIFFUSERS_VERBOSITY says
    try:
        with quiet_type_warnings(["vae"]):
            logger.warning("Expected types for vae: (AutoencoderKLWan,), got FramewiseAutoencoderKL.")
            logger.warning("Expected types for transformer: (WanTransformer3DModel,), got UNet2DModel.")
            logger.warning("Keyword arguments {'x': 1} are not expected by WanPipeline and will be ignored.")
        logger.warning("Expected types for vae: (AutoencoderKLWan,), got FramewiseAutoencoderKL.")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert seen == ["Expected types for transformer: (WanTransformer3DModel,), got UNet2DModel.",
                    "Keyword arguments {'x': 1} are not expected by WanPipeline and will be ignored.",
                    "Expected types for vae: (AutoencoderKLWan,), got FramewiseAutoencoderKL."]


def test_built_video_model_loads_and_samples_clips(built):
    from diffusers import WanPipeline

    from genalign.models import WanAdapter, load_adapter
    from genalign.sampling import latents_to_uint8, sample_latents
    from genalign.world.video_vae import FramewiseAutoencoderKL

    pipe = WanPipeline.from_pretrained(built / "video-base")
    assert isinstance(pipe.vae, FramewiseAutoencoderKL)
    adapter = load_adapter(built / "video-base", max_sequence_length=16)
    assert isinstance(adapter, WanAdapter)
    lat = sample_latents(adapter, ["red circle moving left"], num_steps=2, num_frames=8, height=32, width=32,
                         generator=torch.Generator().manual_seed(0))
    clip = latents_to_uint8(adapter, lat)
    assert clip.shape == (1, 8, 32, 32, 3) and clip.dtype == np.uint8


@pytest.mark.parametrize("kind", ["image", "video"])
def test_shipped_models_come_from_this_build_code(kind):
    """The frozen random-init text encoders of the shipped models are exactly what `genalign world build` creates
    (same seed), so the shipped folders and the build script cannot drift apart unnoticed."""
    from safetensors.torch import load_file

    from genalign.world import world_model_path
    from genalign.world.build import BuildConfig, image_pipeline, small_vae
    from genalign.world.video import video_pipeline

    seed = BuildConfig().seed
    if kind == "image":
        built = image_pipeline(seed)
    else:
        from genalign.world.video_vae import FramewiseAutoencoderKL

        built = video_pipeline(seed, vae=FramewiseAutoencoderKL.from_image_vae(small_vae(seed), [0.0] * 4, [1.0] * 4))
    shipped_dir = world_model_path(kind)
    encoders = ["text_encoder", "text_encoder_2"] if kind == "image" else ["text_encoder"]
    for name in encoders:
        shipped = load_file(next((shipped_dir / name).glob("*.safetensors")))
        fresh = getattr(built, name).state_dict()
        common = set(shipped) & set(fresh)
        assert len(common) >= len(shipped) - 1 > 0
        for key in common:
            assert torch.equal(shipped[key].float(), fresh[key].float()), (name, key)
    cfg = json.loads((shipped_dir / "transformer" / "config.json").read_text())
    for key in ("num_layers", "patch_size", "num_attention_heads", "attention_head_dim"):
        assert json.loads(json.dumps(built.transformer.config[key])) == cfg[key], key


def test_latent_reward_stage_trains_ships_and_records_both_models(built, tmp_path):
    """`genalign world build --only latent-reward` at a tiny budget: pairs of the built image model, the
    noise-aware model and the clean-latent ablation, shipped next to the models, accuracies in BUILD.json."""
    from dataclasses import replace

    from genalign.guidance import LatentRewardModel, latent_space_id
    from genalign.models import load_adapter

    cfg = replace(TINY, latent_reward_pairs=8, latent_reward_heldout_pairs=4, latent_reward_workdir=str(tmp_path),
                  latent_reward_overrides={"max_steps": 2, "batch_size": 4, "hidden": 8, "depth": 1,
                                           "eval_timesteps": [0.0, 0.5], "report_to": "none"})
    build_world(built, cfg, ("latent-reward",))
    report = json.loads((built / "BUILD.json").read_text())
    assert {"vae", "image", "video", "latent-reward"} <= set(report)
    stats = report["latent-reward"]["stats"]
    assert stats["command"].startswith("genalign world build --only latent-reward")
    assert stats["pairs_train"]["pairs"] == 8 and not stats["pairs_train"]["reused"]
    for name, folder in (("noise_aware", "image-latent-reward"), ("clean", "image-latent-reward-clean")):
        assert stats[name]["shipped"] == folder and stats[name]["bytes"] < 1_000_000
        assert set(stats[name]["accuracy"]) == {"VQ", "TA"} and set(stats[name]["accuracy"]["TA"]) == {"0", "0.5"}
        model = LatentRewardModel.from_pretrained(built / folder, latent_space=latent_space_id(
            load_adapter(built / "image-base")), latent_shape=(4, 16, 16))
        assert model.config.extra["training"]["noise_aware"] is (name == "noise_aware")
    # a second build reuses the pairs (same count): only the models are retrained
    build_world(built, cfg, ("latent-reward",))
    assert json.loads((built / "BUILD.json").read_text())["latent-reward"]["stats"]["pairs_train"]["reused"]
