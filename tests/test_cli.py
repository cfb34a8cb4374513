"""The `genalign` command as a user runs it: real subprocesses on the shipped world models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def genalign(*args, check=True, cwd=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-m", "genalign", *map(str, args)], capture_output=True, text=True,
                         check=False, cwd=cwd or REPO, env=env, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"genalign {' '.join(map(str, args))} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out


@pytest.mark.parametrize("cmd", [[], ["sample"], ["eval"], ["cache"], ["world"], ["world", "build"], ["world", "pairs"],
                                 ["train"], ["train", "flow-dpo"], ["train", "reward"], ["quickstart"], ["score"],
                                 ["eval-reward"]])
def test_every_command_has_help(cmd):
    out = genalign(*cmd, "--help")
    assert "usage: genalign" in out.stdout and "-h, --help" in out.stdout


def test_sample_writes_a_grid_of_world_images(tmp_path):
    out = tmp_path / "grid.png"
    genalign("sample", "--prompt", "red circle", "--prompt", "two blue squares", "--num-per-prompt", "2",
             "--steps", "4", "--out", out)
    grid = np.asarray(Image.open(out))
    assert grid.shape[0] > 128 and grid.shape[1] > 4 * 128  # 4 upscaled 32x32 samples with captions


def test_sample_is_reproducible_per_seed(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        genalign("sample", "--prompt", "green triangle", "--num-per-prompt", "1", "--steps", "4", "--seed", seed,
                 "--out", tmp_path / name)
    a, b, c = (np.asarray(Image.open(tmp_path / n / "0000.png")) for n in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_sample_from_an_init_image_is_sdedit_as_in_python_and_keeps_more_of_it_at_low_strength(tmp_path):
    """`--init-image` (a 64 px render, resized to the model's 32 px) with `--strength`: the same pictures as
    sample_latents(init_latents=..., strength=...) with the same seed; nearer the picture at a lower strength."""
    import torch

    from genalign.data.media import to_pixels
    from genalign.models import load_adapter
    from genalign.sampling import latents_to_uint8, sample_latents
    from genalign.world import world_model_path
    from genalign.world.render import render_image, to_uint8

    picture = to_uint8(render_image("red circle", 7))
    Image.fromarray(picture).resize((64, 64), Image.NEAREST).save(tmp_path / "init.png")
    outs = {}
    for strength in ("0.3", "0.9"):
        genalign("sample", "--prompt", "red circle", "--num-per-prompt", "2", "--steps", "10", "--init-image",
                 tmp_path / "init.png", "--strength", strength, "--out", tmp_path / strength)
        outs[strength] = np.stack([np.asarray(Image.open(tmp_path / strength / f"000{i}.png")) for i in range(2)])
    adapter = load_adapter(world_model_path("image"))
    resized = np.asarray(Image.open(tmp_path / "init.png").convert("RGB"))
    with torch.no_grad():
        init = adapter.encode_pixels(to_pixels(resized, (32, 32))[None])
    ours = latents_to_uint8(adapter, sample_latents(adapter, ["red circle"] * 2, num_steps=10, guidance_scale=4.0,
                                                    generator=torch.Generator().manual_seed(0),
                                                    init_latents=init.expand(2, -1, -1, -1), strength=0.3))
    assert np.abs(ours.astype(int) - outs["0.3"]).max() <= 1
    distance = {k: np.abs(v.astype(float) - picture).mean() for k, v in outs.items()}
    assert distance["0.3"] < distance["0.9"]
    bad = genalign("sample", "--prompt", "red circle", "--strength", "0.5", "--out", tmp_path / "x", check=False)
    assert bad.returncode != 0 and "--strength goes with --init-image" in bad.stderr
    (tmp_path / "broken.png").write_bytes(b"not a png")
    bad = genalign("sample", "--prompt", "red circle", "--init-image", tmp_path / "broken.png", "--out",
                   tmp_path / "y", check=False)
    assert bad.returncode != 0 and "broken.png" in bad.stderr


def test_sample_video_writes_mp4(tmp_path):
    genalign("sample", "--kind", "video", "--prompt", "red circle moving left", "--num-per-prompt", "1",
             "--steps", "4", "--out", tmp_path / "vid")
    from genalign.data import read_video

    clip = read_video(tmp_path / "vid" / "0000.mp4")
    assert clip.shape == (8, 32, 32, 3)


def test_eval_reports_oracle_scores_with_intervals(tmp_path):
    out = genalign("eval", "--num-prompts", "6", "--samples-per-prompt", "2", "--steps", "4", "--out", tmp_path)
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["num_prompts"] == 6 and report["num_samples"] == 12
    for dim in ("VQ", "TA"):
        r = report[dim]
        assert 0 <= r["lo"] <= r["mean"] <= r["hi"] <= 1.0 + 1e-9 or np.isnan(r["lo"])
    assert "TA" in out.stdout and "95% CI" in out.stdout
    assert (tmp_path / "samples.png").is_file() and (tmp_path / "scores.png").is_file()


def test_world_pairs_writes_pickapic_parquet_readable_by_the_data_reader(tmp_path):
    genalign("world", "pairs", "--num-pairs", "6", "--steps", "4", "--noise", "0", "--device", "cpu", "--workers", "2",
             "--out", tmp_path)
    from genalign.data import load_preference_pairs

    ds = load_preference_pairs(tmp_path / "pairs.parquet", tie_policy="half")
    assert len(ds) == 6
    pair = ds[0]
    assert pair.media_a.shape == (32, 32, 3) and pair.label in (0.0, 0.5, 1.0)
    bad = genalign("world", "pairs", "--num-pairs", "2", "--device", "gpu0", "--out", tmp_path / "b", check=False)
    assert bad.returncode != 0 and "--device 'gpu0' is not a device" in bad.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("kind", ["image", "video"])
def test_world_pairs_with_k_samples_per_prompt_pair_every_two_of_a_prompts_samples(tmp_path, kind):
    """--samples-per-prompt 3: 3 pairs per prompt (0-1, 0-2, 1-2) from the same 3 samples `genalign eval`'s
    sampler draws for those prompts, cut at --num-pairs; labels are the clean annotator's on the oracle. Video: each
    clip is written once, however many pairs it is in."""
    genalign("world", "pairs", "--kind", kind, "--num-pairs", "5", "--samples-per-prompt", "3", "--steps", "4",
             "--noise", "0", "--out", tmp_path)
    from genalign.cli import load_model
    from genalign.data import load_preference_pairs
    from genalign.eval.oracle_eval import generate
    from genalign.world.annotators import overall_image_score
    from genalign.world.grammar import pair_prompts
    from genalign.world.oracle import judge

    ds = load_preference_pairs(tmp_path / ("pairs.parquet" if kind == "image" else "pairs.csv"), tie_policy="half")
    assert len(ds) == 5
    prompts = pair_prompts(kind, "train", 2, 0)  # ceil(5 / 3) prompts
    adapter, defaults, _, _ = load_model("world", kind, [])
    sampling = {k: defaults[k] for k in ("guidance_scale", "height", "width")}
    if kind == "video":
        sampling["num_frames"] = defaults.get("num_frames", 17)  # the CLI's default
    samples, _ = generate(adapter, prompts, 3, seed=0, progress=False, num_steps=4, **sampling)
    expected = [(0, 1), (0, 2), (1, 2), (3, 4), (3, 5)]
    for row, (i, j) in enumerate(expected):
        pair = ds[row]
        assert pair.prompt == prompts[i // 3]
        np.testing.assert_array_equal(pair.media_a, samples[i])
        np.testing.assert_array_equal(pair.media_b, samples[j])
        ja, jb = judge(samples[i], pair.prompt).as_dict(), judge(samples[j], pair.prompt).as_dict()
        if kind == "image":
            sa, sb = overall_image_score(ja), overall_image_score(jb)
            assert pair.label == (0.5 if abs(sa - sb) < 0.05 else float(sa > sb))
        else:
            for d in ("VQ", "MQ", "TA"):
                assert pair.labels[d] == (0.5 if abs(ja[d] - jb[d]) < 0.05 else float(ja[d] > jb[d]))
    if kind == "video":  # 6 samples, 6 files: sample 0 is in two pairs and written once
        assert sorted(f.name for f in (tmp_path / "videos").iterdir()) == [f"pair-sample{n:05d}.mp4" for n in range(6)]
    bad = genalign("world", "pairs", "--samples-per-prompt", "1", "--out", tmp_path / "b", check=False)
    assert bad.returncode != 0 and "--samples-per-prompt" in bad.stderr


def test_world_pairs_from_renders_pit_each_train_prompt_against_a_one_attribute_swap(tmp_path):
    """`--source renders`: the prompt's clip (A) vs the clip of a swapped train prompt, same seed; TA goes to A;
    half the pairs through the autoencoder (every clip written as lossless uint8 MP4, none black)."""
    genalign("world", "pairs", "--kind", "video", "--source", "renders", "--num-pairs", "8", "--noise", "0",
             "--out", tmp_path)
    from genalign.data import load_preference_pairs
    from genalign.world.grammar import video_splits
    from genalign.world.oracle import judge_video
    from genalign.world.render import render_video, to_uint8

    ds = load_preference_pairs(tmp_path / "pairs.csv", tie_policy="half")
    train = set(video_splits().train)
    assert len(ds) == 8 and all(p in train for p in ds.prompts)
    exact = 0
    for i in range(len(ds)):
        pair = ds[i]
        assert pair.labels["TA"] == 1.0
        assert judge_video(pair.media_a, pair.prompt).TA > judge_video(pair.media_b, pair.prompt).TA
        assert pair.media_a.mean() > 10 and pair.media_b.mean() > 10  # not black
        exact += np.array_equal(pair.media_a, to_uint8(render_video(pair.prompt, i)))
    assert 0 < exact < 8  # some pairs are plain renders, some went through the autoencoder
    bad = genalign("world", "pairs", "--source", "renders", "--model", "x", "--out", tmp_path / "b", check=False)
    assert bad.returncode != 0 and "leave out --model" in bad.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["sample", "--prompt", "", "--out", "x.png"], "empty"),
        (["sample", "--prompt", "purple circle", "--out", "x.png"], "unknown colour"),
        (["world", "build", "--out", "unused", "image_stepz=3"], "unknown config key 'image_stepz'"),
    ],
)
def test_bad_input_gets_one_clear_line(tmp_path, args, message):
    out = genalign(*args, check=False, cwd=tmp_path)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_wrong_family_model_folder_is_refused(tmp_path):
    from genalign.world import world_model_path

    # the world's video folder handed to an image-only code path: load_adapter picks Wan; a plain folder fails
    (tmp_path / "not-a-model").mkdir()
    out = genalign("sample", "--model", tmp_path / "not-a-model", "--prompt", "red circle", "--out", tmp_path / "x.png",
                   check=False)
    assert out.returncode == 2 and "model_index.json" in out.stderr and "Traceback" not in out.stderr
    assert world_model_path("video").is_dir()


def test_quickstart_end_to_end_at_a_tiny_budget(tmp_path):
    out = tmp_path / "qs"
    genalign("quickstart", "--steps", "4", "--num-pair-prompts", "24", "--eval-prompts", "4",
             "--eval-samples-per-prompt", "2", "--out", out)
    report = json.loads((out / "report.json").read_text())
    assert report["train"]["steps"] == 4
    assert report["pairs"]["rows"] == 24
    assert {"TA", "VQ"} <= set(report["aligned_minus_base"])
    for name in ("report.md", "samples.png", "curve.png", "pairs/pairs.parquet", "train/lora"):
        assert (out / name).exists(), name
    # the printed command samples with the trained LoRA
    lora = out / "train" / "lora"
    genalign("sample", "--lora", lora, "--prompt", "red circle", "--num-per-prompt", "1", "--steps", "2",
             "--out", tmp_path / "aligned.png")
    assert (tmp_path / "aligned.png").is_file()


def test_train_flow_dpo_from_the_cli_and_resume(tmp_path):
    genalign("world", "pairs", "--num-pairs", "12", "--steps", "3", "--noise", "0", "--out", tmp_path / "pairs")
    args = ["train", "flow-dpo", "--config", "flow_dpo_world", f"data={tmp_path / 'pairs' / 'pairs.parquet'}",
            f"output_dir={tmp_path / 'run'}", "batch_size=2", "checkpoint_every=2", "tie_policy=half", "num_threads=1", "log_every=1"]
    genalign(*args, "max_steps=2")
    assert (tmp_path / "run" / "checkpoint-2" / "lora").is_dir()
    genalign(*args, "max_steps=4", "--resume", "latest")
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_world_model_names_follow_kind_unless_they_name_one():
    """--model world, like no --model, is the world model of --kind; world-image / world-video name one model."""
    from genalign.world import resolve_model, world_model_path

    image, video = str(world_model_path("image")), str(world_model_path("video"))
    assert resolve_model(None, "video")[0] == resolve_model("world", "video")[0] == video
    assert resolve_model(None)[0] == resolve_model("world")[0] == resolve_model("world", "image")[0] == image
    assert resolve_model("world-image", "video")[0] == image and resolve_model("world-video")[0] == video
    assert resolve_model("world", "video")[2]["num_steps"] > 0  # the video model's own sampling defaults


@pytest.fixture(scope="module")
def random_lora(tmp_path_factory):
    """A LoRA on the world image model with random B (a fresh LoRA is a no-op), saved in diffusers format."""
    import torch

    from genalign.models import load_adapter
    from genalign.world import resolve_model

    path, kw, _ = resolve_model("world")
    adapter = load_adapter(path, **kw)
    adapter.add_lora()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in adapter.denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return adapter.save_lora(tmp_path_factory.mktemp("lora"))


def test_sample_with_rlg_scale_dials_between_base_and_lora(tmp_path, random_lora):
    common = ["--prompt", "red circle left of blue square", "--num-per-prompt", "1", "--steps", "4", "--seed", "3"]
    genalign("sample", *common, "--out", tmp_path / "base")
    genalign("sample", *common, "--lora", random_lora, "--out", tmp_path / "lora")
    for w in ("0", "1", "2"):
        genalign("sample", *common, "--lora", random_lora, "--rlg-scale", w, "--out", tmp_path / f"w{w}")
    img = {n: np.asarray(Image.open(tmp_path / n / "0000.png")) for n in ("base", "lora", "w0", "w1", "w2")}
    assert np.array_equal(img["w0"], img["base"]) and np.array_equal(img["w1"], img["lora"])
    assert not np.array_equal(img["base"], img["lora"]) and not np.array_equal(img["w2"], img["w1"])
    out = genalign("sample", *common, "--rlg-scale", "1", "--out", tmp_path / "x", check=False)
    assert out.returncode == 2 and "--lora" in out.stderr and "Traceback" not in out.stderr
    out = genalign("sample", *common, "--lora", random_lora, "--rlg-scale", "7", "--out", tmp_path / "x", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_quickstart_video_end_to_end_at_a_tiny_budget(tmp_path):
    out = tmp_path / "qsv"
    genalign("quickstart", "--video", "--steps", "3", "--num-pair-prompts", "8", "--eval-prompts", "4",
             "--eval-samples-per-prompt", "2", "--out", out)
    report = json.loads((out / "report.json").read_text())
    assert {"VQ", "MQ", "TA"} <= set(report["aligned_minus_base"])
    assert (out / "pairs" / "pairs.csv").is_file() and (out / "train" / "lora").is_dir()
    assert "--kind video --lora" in report["sample_command"]
    # best-vs-worst of 4 clips per prompt, and the winners' flow-matching term on by default for video
    assert report["pairs"]["rows"] == 8
    assert yaml.safe_load((out / "train" / "config.yaml").read_text())["sft_weight"] == 1.0
