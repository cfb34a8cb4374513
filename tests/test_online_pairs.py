"""Online preference pairs: K samples per prompt from the current model, best vs worst by a scorer."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from genalign.trainers.online_pairs import best_vs_worst, draw_prompts, sample_online_pairs, world_scorer
from genalign.world.annotators import Annotator
from genalign.world.oracle import judge
from genalign.world.render import render_image, to_uint8


def test_best_vs_worst_picks_extremes_per_prompt():
    scores = np.array([[0.1, 0.9, 0.5], [0.3, 0.2, 0.2], [0.7, 0.7, 0.1]])
    best, worst = best_vs_worst(scores)
    assert best.tolist() == [1, 0, 0] and worst.tolist() == [0, 1, 2]


def test_world_scorer_is_the_weighted_oracle():
    prompt = "red circle left of blue square"
    good = to_uint8(render_image(prompt, seed=0))
    wrong = to_uint8(render_image("green triangle", seed=0))
    j_good, j_wrong = judge(good, prompt).as_dict(), judge(wrong, prompt).as_dict()
    scores = world_scorer({"TA": 0.75, "VQ": 0.25})(np.stack([good, wrong]), [prompt, prompt])
    assert scores[0] == pytest.approx(0.75 * j_good["TA"] + 0.25 * j_good["VQ"])
    assert scores[1] == pytest.approx(0.75 * j_wrong["TA"] + 0.25 * j_wrong["VQ"])
    assert scores[0] > scores[1]
    with pytest.raises(ValueError, match="MQ"):
        world_scorer({"MQ": 1.0})(good[None], [prompt])


def test_draw_prompts_is_reproducible():
    pool = [f"p{i}" for i in range(50)]
    assert draw_prompts(pool, 10, seed=3) == draw_prompts(pool, 10, seed=3)
    assert draw_prompts(pool, 10, seed=3) != draw_prompts(pool, 10, seed=4)


@pytest.fixture(scope="module")
def world_adapter():
    from genalign.models import load_adapter
    from genalign.world import resolve_model

    path, kw, _ = resolve_model("world")
    return load_adapter(path, **kw)


def test_sample_online_pairs_keeps_best_vs_worst_of_k(tmp_path, world_adapter):
    prompts = ["red circle", "blue square left of green triangle", "two yellow circles"]
    scorer_calls = []
    base = world_scorer({"TA": 0.5, "VQ": 0.5})

    def scorer(media, ps):
        scorer_calls.append((media.copy(), list(ps)))
        return base(media, ps)

    noiseless = Annotator(noise=0.0, tie_margin=0.0, seed=0)
    info = sample_online_pairs(world_adapter, prompts, tmp_path, k=3, scorer=scorer, annotator=noiseless, seed=1,
                               progress=False, num_steps=4, guidance_scale=4.0, height=32, width=32)
    (media, flat), = scorer_calls
    assert media.shape[0] == 9 and flat == [p for p in prompts for _ in range(3)]
    scores = np.asarray(base(media, flat)).reshape(3, 3)
    rows = pq.read_table(info["path"]).to_pylist()
    assert info["num_pairs"] == 3 == info["num_prompts"] == len(rows)
    assert info["margin"] == pytest.approx(float(np.mean(scores.max(1) - scores.min(1))))
    assert [r["caption"] for r in rows] == prompts
    decided = [i for i in range(3) if scores[i].max() > scores[i].min()]  # tie_margin 0: only equal scores tie
    assert info["num_ties"] == 3 - len(decided)
    for i, r in enumerate(rows):
        if i not in decided:
            assert r["label_0"] == 0.5
            continue
        img_0 = np.asarray(Image.open(io.BytesIO(r["jpg_0"])))
        img_1 = np.asarray(Image.open(io.BytesIO(r["jpg_1"])))
        assert np.array_equal(img_0, media[3 * i + scores[i].argmax()])  # PNG is lossless: the exact candidates
        assert np.array_equal(img_1, media[3 * i + scores[i].argmin()])
        assert r["label_0"] == 1.0 and r["score_0"] == pytest.approx(scores[i].max())


def test_sample_online_pairs_rejects_bad_arguments(tmp_path, world_adapter):
    with pytest.raises(ValueError, match="k=1"):
        sample_online_pairs(world_adapter, ["red circle"], tmp_path, k=1)
    with pytest.raises(ValueError, match="no prompts"):
        sample_online_pairs(world_adapter, [], tmp_path, k=2)


def _online_config(out, **kw):
    from genalign.trainers import FlowDPOConfig
    from genalign.world import resolve_model

    _, extra, _ = resolve_model("world")
    cfg = {"output_dir": str(out), "model": "world", "online_prompts": "world", "online_rounds": 2,
           "online_prompts_per_round": 4, "online_k": 3, "max_steps": 4, "batch_size": 2, "lr": 1e-3, "beta": 100.0,
           "lora_rank": 4, "seed": 0, "checkpoint_every": 1, "log_every": 1, "report_to": "none",
           "progress_bar": False, "num_threads": 1, "max_sequence_length": extra.get("max_sequence_length")}
    cfg.update(kw)
    return FlowDPOConfig(**cfg)


def _lora_weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "pytorch_lora_weights.safetensors"))


def test_online_flow_dpo_rounds_resume_exactly_after_a_crash(tmp_path, monkeypatch):
    """Two rounds straight == round 0, a crash while sampling round 1's pairs, then a restart (fresh process
    state: a new adapter without the LoRA)."""
    from genalign.models import load_adapter
    from genalign.trainers import online_pairs
    from genalign.world import resolve_model

    path, kw, _ = resolve_model("world")
    straight = online_pairs.train_online(_online_config(tmp_path / "a"), adapter=load_adapter(path, **kw))
    assert straight.final_model_dir == tmp_path / "a" / "lora"
    for r in (0, 1):
        assert (tmp_path / "a" / f"round-{r}" / "pairs" / "pairs.parquet").is_file()
        assert (tmp_path / "a" / f"round-{r}" / "lora").is_dir()
    # Round 1 trains from round 0's LoRA, so its reference snapshot is round 0's final weights.
    assert (tmp_path / "a" / "round-1" / "metrics.jsonl").read_text().count('"step"') == 2

    real_sample = online_pairs.sample_online_pairs
    calls = []

    def crash_in_round_1(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while sampling round 1")
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(online_pairs, "sample_online_pairs", crash_in_round_1)
    with pytest.raises(KeyboardInterrupt):
        online_pairs.train_online(_online_config(tmp_path / "b"), adapter=load_adapter(path, **kw))
    monkeypatch.setattr(online_pairs, "sample_online_pairs", real_sample)
    online_pairs.train_online(_online_config(tmp_path / "b"), adapter=load_adapter(path, **kw))

    a, b = _lora_weights(tmp_path / "a" / "lora"), _lora_weights(tmp_path / "b" / "lora")
    assert a.keys() == b.keys() and len(a) > 0
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # it trained


def test_online_config_errors():
    from genalign.config import ConfigError

    with pytest.raises(ConfigError, match="online_k"):
        _online_config("x", online_k=1)
    with pytest.raises(ConfigError, match="online_rounds"):
        _online_config("x", online_rounds=5, max_steps=4)
    with pytest.raises(ConfigError, match="online_prompts"):
        from genalign.trainers.online_pairs import prompt_pool

        prompt_pool("/nonexistent/prompts.txt")


def test_aligned_build_stage_ships_a_lora_with_its_config(tmp_path):
    """`genalign world build --only aligned` at a tiny budget: the LoRA and a portable config.yaml land in the
    output folder, and the base-vs-aligned evaluation is reported."""
    import shutil

    import yaml

    from genalign.world import ALIGNED_LORA_DIRS, world_model_path
    from genalign.world.aligned_build import build_aligned_lora
    from genalign.world.build import BuildConfig

    out = tmp_path / "assets"
    shutil.copytree(world_model_path("image"), out / "image-base")
    overrides = ["online_prompts_per_round=8", "online_k=4", "max_steps=2", "batch_size=2", "checkpoint_every=1",
                 "progress_bar=false", "report_to=none"]
    stats = build_aligned_lora(out, BuildConfig(threads=1), workdir=str(tmp_path / "work"), overrides=overrides,
                               eval_prompts=3, eval_samples_per_prompt=1)
    lora = out / ALIGNED_LORA_DIRS["image"]
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    config = yaml.safe_load((lora / "config.yaml").read_text())
    assert config["model"] == "world" and config["beta"] == 100.0 and config["max_steps"] == 2
    assert stats["eval"]["num_prompts"] == 3 and {"TA", "VQ"} <= set(stats["eval"]["aligned_minus_base"])
    assert _lora_weights(lora).keys() == _lora_weights(tmp_path / "work" / "lora").keys()


def test_online_video_pairs_are_best_vs_worst_clips_in_videoalign_csv(tmp_path):
    import csv

    from genalign.data import load_preference_pairs, read_video
    from genalign.models import load_adapter
    from genalign.world import resolve_model

    path, kw, _ = resolve_model("world-video")
    adapter = load_adapter(path, **kw)
    prompts = ["red circle moving right", "blue square moving up"]
    seen = []
    base = world_scorer()

    def scorer(media, ps):
        seen.append(media.copy())
        return base(media, ps)

    info = sample_online_pairs(adapter, prompts, tmp_path, k=3, scorer=scorer, seed=2, progress=False, num_steps=3,
                               guidance_scale=4.0, height=32, width=32, num_frames=8)
    (media,) = seen
    scores = np.asarray(base(media, [p for p in prompts for _ in range(3)])).reshape(2, 3)
    with open(info["path"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["prompt"] for r in rows] == prompts and info["num_pairs"] == 2
    for i, r in enumerate(rows):
        clip_a = read_video(tmp_path / r["path_A"])
        assert clip_a.shape == media[0].shape
        # the winner's file is the best-scored candidate (MP4 written losslessly enough to be the closest)
        dists = [np.abs(clip_a.astype(int) - media[3 * i + j]).mean() for j in range(3)]
        assert int(np.argmin(dists)) == int(scores[i].argmax())
        assert {r["VQ"], r["MQ"], r["TA"]} <= {"A", "B", "same"}
    assert len(load_preference_pairs(info["path"], tie_policy="half")) == 2
