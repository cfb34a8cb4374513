"""The built-in world: grammar, renderer, oracle validation (>= 99% on known corruptions), corpus, annotators, toy."""

import math
import random

import numpy as np
import pytest
import torch

from genalign.data.media import read_video
from genalign.media import save_png, write_video
from genalign.world import grammar, toy2d
from genalign.world.annotators import Annotator, label_image_pairs, label_video_pairs
from genalign.world.corpus import CorpusShares, make_image_corpus, make_video_corpus, miscaption
from genalign.world.oracle import analyze_image, judge_image, judge_video
from genalign.world.render import (
    IMAGE_CORRUPTIONS,
    corrupt_image,
    flicker_video,
    jitter_video,
    render_image,
    render_video,
    to_uint8,
)


# ------------------------------------------------------------------ grammar
def test_splits_are_fixed_disjoint_and_cover_every_template():
    s1, s2 = grammar.image_splits(), grammar.image_splits()
    assert s1 == s2
    assert not set(s1.train) & set(s1.heldout)
    all_prompts = [p for group in grammar.all_image_prompts().values() for p in group]
    assert sorted(s1.train + s1.heldout) == sorted(all_prompts)
    for part in (s1.train, s1.heldout):
        assert {grammar.parse_prompt(p).template for p in part} == {"single", "count", "relation"}
    v = grammar.video_splits()
    assert not set(v.train) & set(v.heldout) and len(v.heldout) == round(0.2 * 120)
    evalp = grammar.heldout_eval_prompts("image", n=60)
    assert len(evalp) == 60 and set(evalp) <= set(s1.heldout)
    counts = {t: sum(grammar.parse_prompt(p).template == t for p in evalp) for t in ("single", "count", "relation")}
    # the small templates are taken whole, relations fill the rest
    assert counts["single"] == 5 and counts["count"] == 10 and counts["relation"] == 45


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("red circle", ((("red", "circle"),), None, None)),
        ("two blue crosses", ((("blue", "cross"),) * 2, None, None)),
        ("three cyan squares", ((("cyan", "square"),) * 3, None, None)),
        ("red circle left of blue square", ((("red", "circle"), ("blue", "square")), "left of", None)),
        ("Green Triangle above yellow cross", ((("green", "triangle"), ("yellow", "cross")), "above", None)),
        ("magenta cross moving up", ((("magenta", "cross"),), None, "up")),
    ],
)
def test_parse_prompt(prompt, expected):
    spec = grammar.parse_prompt(prompt)
    objs, rel, direction = expected
    assert [(o.color, o.shape) for o in spec.objects] == list(objs)
    assert spec.relation == rel and spec.direction == direction


@pytest.mark.parametrize("bad, message", [("", "empty"), ("purple circle", "colour"), ("red hexagon", "shape"),
                                          ("red circle moving sideways", "direction"), ("a red circle on top", "not in")])
def test_parse_prompt_errors_name_the_problem(bad, message):
    with pytest.raises(grammar.PromptError, match=message):
        grammar.parse_prompt(bad)


# ------------------------------------------------------------------ renderer
def test_renderer_is_deterministic_and_seed_dependent():
    a, b, c = render_image("red circle", 3), render_image("red circle", 3), render_image("red circle", 4)
    assert a.shape == (32, 32, 3) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    v = render_video("blue square moving right", 1)
    assert v.shape == (8, 32, 32, 3) and np.array_equal(v, render_video("blue square moving right", 1))


def test_rendered_colour_is_the_palette_colour():
    img = render_image("yellow square", 0)
    obj = analyze_image(to_uint8(img)).objects[0]
    centre = img[int(obj.cy), int(obj.cx)]
    assert np.allclose(centre, grammar.COLORS["yellow"], atol=1e-6)


# ------------------------------------------------------------------ oracle validation
N_ORACLE = 200


@pytest.mark.parametrize("template", ["single", "count", "relation"])
def test_oracle_recognises_clean_renders(template):
    prompts = grammar.all_image_prompts()[template]
    rng = random.Random(0)
    correct = 0
    for i in range(N_ORACLE):
        p = rng.choice(prompts)
        j = judge_image(to_uint8(render_image(p, 1000 + i)), p)
        correct += j.TA == 1.0
    assert correct / N_ORACLE >= 0.99


def test_oracle_colour_and_shape_accuracy_on_single_objects():
    rng = random.Random(1)
    colour = shape = 0
    for i in range(N_ORACLE):
        p = rng.choice(grammar.all_image_prompts()["single"])
        j = judge_image(to_uint8(render_image(p, i)), p)
        colour += j.details["color_ok"]
        shape += j.details["shape_ok"]
    assert colour / N_ORACLE >= 0.99 and shape / N_ORACLE >= 0.99


def test_oracle_reports_each_text_alignment_check_and_ta_is_their_mean():
    """details holds TA's checks one by one (objects right in colour and shape, the count, the relation), so that
    an analysis can ask which of them two pictures differ in; TA is their mean, for right and wrong captions."""
    rng = random.Random(4)
    wrong = 0
    for i in range(60):
        template = ("single", "count", "relation")[i % 3]
        p = rng.choice(grammar.all_image_prompts()[template])
        q = rng.choice(grammar.all_image_prompts()[template]) if i % 2 else p  # a render of another prompt
        j = judge_image(to_uint8(render_image(q, i)), p)
        objects = {"single": 1, "relation": 2}.get(template) or grammar.COUNTS[p.split()[0]]
        relation = 0.0 if math.isnan(j.details["relation_ok"]) else j.details["relation_ok"]
        assert math.isnan(j.details["relation_ok"]) == (template != "relation")
        assert 0 <= j.details["objects_ok"] <= objects and j.details["count_ok"] in (0.0, 1.0)
        checks = objects + 1 + (template == "relation")
        assert j.TA == pytest.approx((j.details["objects_ok"] + j.details["count_ok"] + relation) / checks)
        wrong += j.TA < 1.0
    assert wrong >= 15  # the other prompts' renders fail some checks


def test_oracle_ta_drops_for_a_mismatched_caption():
    rng = random.Random(2)
    lower = 0
    for i in range(N_ORACLE):
        p = rng.choice(grammar.image_splits().train)
        img = to_uint8(render_image(p, i))
        lower += judge_image(img, miscaption(p, rng)).TA < judge_image(img, p).TA
    assert lower / N_ORACLE >= 0.99


@pytest.mark.parametrize("kind", IMAGE_CORRUPTIONS)
def test_oracle_ranks_clean_above_corrupted(kind):
    rng = random.Random(3)
    wins = 0
    for i in range(N_ORACLE):
        p = rng.choice(grammar.image_splits().train)
        clean = render_image(p, i)
        bad = corrupt_image(clean, kind, np.random.default_rng(i))
        wins += judge_image(to_uint8(clean), p).VQ > judge_image(to_uint8(bad), p).VQ
    assert wins / N_ORACLE >= 0.99


def test_oracle_on_videos_direction_motion_and_flicker():
    prompts = grammar.all_video_prompts()
    n = 100
    direction_ok = mq_wins = vq_wins = 0
    for i in range(n):
        p = prompts[(i * 7) % len(prompts)]
        clean = to_uint8(render_video(p, i))
        j = judge_video(clean, p)
        direction_ok += j.details["direction_ok"] and j.TA == 1.0
        if not p.endswith("still"):
            mq_wins += j.MQ > judge_video(to_uint8(jitter_video(p, i)), p).MQ
        else:
            mq_wins += 1
        vq_wins += j.VQ > judge_video(to_uint8(flicker_video(render_video(p, i), np.random.default_rng(i))), p).VQ
    assert direction_ok / n >= 0.99 and mq_wins / n >= 0.99 and vq_wins / n >= 0.99


def test_oracle_on_an_empty_image_scores_zero():
    blank = np.full((32, 32, 3), 40, np.uint8)
    j = judge_image(blank, "red circle")
    assert j.TA == 0.0 and j.VQ == 0.0


# ------------------------------------------------------------------ corpus and annotators
def test_corpus_flaw_shares_and_labels():
    c = make_image_corpus(600, seed=0, shares=CorpusShares(wrong_caption=0.25, degraded=0.2))
    assert c.media.shape == (600, 32, 32, 3) and c.media.dtype == np.uint8
    assert abs(c.wrong_caption.mean() - 0.25) < 0.06 and abs(c.degraded.mean() - 0.2) < 0.06
    for cap, true, wrong in zip(c.captions, c.true_prompts, c.wrong_caption):
        assert (cap != true) == wrong
        assert true in grammar.image_splits().train
    # the flaws are real: the oracle sees them
    ta = [judge_image(m, cap).TA for m, cap in zip(c.media[:200], c.captions[:200])]
    assert np.mean([t for t, w in zip(ta, c.wrong_caption[:200]) if w]) < np.mean([t for t, w in zip(ta, c.wrong_caption[:200]) if not w]) - 0.2
    v = make_video_corpus(40, seed=0)
    assert v.media.shape == (40, 8, 32, 32, 3)


def test_annotator_ties_and_noise_rate():
    clean = Annotator(tie_margin=0.05, noise=0.0)
    assert clean.label(0.9, 0.5) == "A" and clean.label(0.5, 0.9) == "B" and clean.label(0.5, 0.53) == "same"
    noisy = Annotator(tie_margin=0.05, noise=0.2, seed=1)
    labels = [noisy.label(0.9, 0.1) for _ in range(5000)]
    assert abs(labels.count("A") / 5000 - 0.8) < 0.02
    assert abs(labels.count("B") / 5000 - 0.1) < 0.015 and abs(labels.count("same") / 5000 - 0.1) < 0.015


def test_image_pairs_rows_in_pickapic_format():
    p = "red circle left of blue square"
    good, bad = to_uint8(render_image(p, 0)), to_uint8(render_image("blue square left of red circle", 0))
    rows = label_image_pairs(np.stack([good, bad]), np.stack([bad, good]), [p, p], Annotator(noise=0.0))
    assert [r["label_0"] for r in rows] == [1.0, 0.0]
    assert all(r["label_0"] + r["label_1"] == 1.0 for r in rows)
    import io

    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(io.BytesIO(rows[0]["jpg_0"]))), good)


def test_pairs_of_several_samples_per_prompt_store_each_picture_once(tmp_path):
    """K samples per prompt name each picture K - 1 times; the parquet file holds it once per column (dictionary
    pages past pyarrow's 1 MB default), reads back unchanged, and keeps no PNG bytes as column statistics."""
    import pyarrow.parquet as pq

    from genalign.world.annotators import png_bytes, write_pickapic_parquet

    k, prompts = 8, 64  # 28 pairs per prompt: 1792 rows, past pyarrow's write batch of 1024
    rng = np.random.default_rng(0)
    pictures = [png_bytes(rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)) for _ in range(prompts * k)]
    rows = [{"caption": f"prompt {p}", "jpg_0": pictures[p * k + i], "jpg_1": pictures[p * k + j],
             "label_0": 1.0, "label_1": 0.0}
            for p in range(prompts) for i in range(k) for j in range(i + 1, k)]
    path = write_pickapic_parquet(rows, tmp_path / "pairs.parquet")
    per_column = [sum(len(b) for b in {r[c] for r in rows}) for c in ("jpg_0", "jpg_1")]
    assert min(per_column) > 2**20  # past the default dictionary page limit
    assert path.stat().st_size < 1.1 * sum(per_column)  # plain encoding stores each picture 7 times in all
    table = pq.read_table(path)
    assert table.to_pylist() == rows
    chunk = pq.ParquetFile(path).metadata.row_group(0)
    names = table.column_names
    assert chunk.column(names.index("jpg_0")).statistics is None
    assert chunk.column(names.index("label_0")).statistics is not None


def test_video_pairs_rows_in_videoalign_format(tmp_path):
    p = "red circle moving left"
    good = to_uint8(render_video(p, 0))
    jittery = to_uint8(jitter_video(p, 0, amount=2.5))
    wrong_way = to_uint8(render_video("red circle moving right", 0))
    rows = label_video_pairs(np.stack([good, good]), np.stack([jittery, wrong_way]), [p, p], Annotator(noise=0.0), tmp_path)
    assert rows[0]["MQ"] == "A" and rows[1]["TA"] == "A"
    assert rows[1]["MQ"] == "same"  # both move smoothly
    assert (tmp_path / rows[0]["path_A"]).is_file() and rows[0]["fps_A"] == 8 and rows[0]["num_frames_A"] == 8


def test_render_pairs_for_images_differ_in_one_attribute_and_label_the_prompts_render(tmp_path):
    from genalign.data import load_preference_pairs
    from genalign.world.annotators import make_render_pairs

    prompts = grammar.image_splits().train[:6]
    path = make_render_pairs("image", prompts, tmp_path, Annotator(noise=0.0), seed=3, autoencoder=0.0,
                             allowed=set(grammar.image_splits().train))
    ds = load_preference_pairs(path, tie_policy="half")
    assert ds.prompts == prompts and ds.stats["a_wins"] == 6
    for i, p in enumerate(prompts):
        assert np.array_equal(ds[i].media_a, to_uint8(render_image(p, 3 * 1_000_003 + i)))
    with pytest.raises(ValueError, match="kind must be"):
        make_render_pairs("audio", prompts, tmp_path, Annotator(noise=0.0))


def test_sdedit_render_pairs_look_like_the_generator_and_keep_the_render_more_the_lower_the_strength(tmp_path):
    """`sdedit_adapter`: each render goes through the world image model by SDEdit on its own prompt. The pictures
    change (they are the generator's), stay nearer the render at a lower strength, the same seed gives the same
    pictures, and the prompt's side keeps the oracle's text alignment on most pairs."""
    from genalign.data import load_preference_pairs
    from genalign.models import load_adapter
    from genalign.world import world_model_path
    from genalign.world.annotators import make_render_pairs, sdedit_images

    adapter = load_adapter(world_model_path("image"))
    prompts = grammar.image_splits().train[:8]
    renders = np.stack([to_uint8(render_image(p, 3 * 1_000_003 + i)) for i, p in enumerate(prompts)])
    kw = {"num_steps": 10, "guidance_scale": 4.0, "progress": False}
    distance = {s: np.abs(sdedit_images(adapter, renders, prompts, s, seed=3, **kw).astype(float) - renders).mean()
                for s in (0.3, 0.9)}
    assert 0 < distance[0.3] < distance[0.9]
    path = make_render_pairs("image", prompts, tmp_path, Annotator(noise=0.0), seed=3, progress=False,
                             allowed=set(grammar.image_splits().train), sdedit_adapter=adapter, sdedit_strength=0.6,
                             num_steps=10, guidance_scale=4.0)
    ds = load_preference_pairs(path, tie_policy="half")
    assert ds.prompts == prompts
    a = np.stack([ds[i].media_a for i in range(len(ds))])
    assert np.array_equal(a, sdedit_images(adapter, renders, prompts, 0.6, seed=3, **kw))
    assert not np.array_equal(a, renders)
    kept = sum(judge_image(ds[i].media_a, p).TA > judge_image(ds[i].media_b, p).TA for i, p in enumerate(prompts))
    assert kept >= 5, kept


def test_pairs_written_from_float_renders_keep_their_pixels(tmp_path):
    """The renderer returns floats in [0, 1]; writing them used to cast straight to uint8: an all-black clip with a
    label computed from the real one."""
    p = "red circle moving left"
    clip = render_video(p, 0)
    rows = label_video_pairs(clip[None], render_video("red circle moving right", 0)[None], [p], Annotator(noise=0.0), tmp_path)
    assert np.array_equal(read_video(tmp_path / rows[0]["path_A"]), to_uint8(clip))  # lossless MP4
    image = render_image("red circle left of blue square", 0)
    row = label_image_pairs(image[None], image[None], ["red circle left of blue square"], Annotator(noise=0.0))[0]
    import io

    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(io.BytesIO(row["jpg_0"]))), to_uint8(image))


@pytest.mark.parametrize("bad, message", [
    (np.full((2, 8, 8, 3), 200.0), r"float pixels must lie in \[0, 1\], got values in \[200, 200\]"),
    (np.zeros((2, 8, 8, 3), dtype=np.int64), "integer pixels must be uint8"),
    (np.full((2, 8, 8, 3), np.nan), r"float pixels must lie in \[0, 1\]"),
])
def test_writing_pixels_of_an_unknown_scale_is_refused_naming_the_file(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message) as err:
        write_video(tmp_path / "clip.mp4", bad)
    assert "clip.mp4" in str(err.value) and not (tmp_path / "clip.mp4").exists()
    with pytest.raises(ValueError, match=message):
        save_png(tmp_path / "frame.png", bad[0])
    assert not (tmp_path / "frame.png").exists()


# ------------------------------------------------------------------ the 2-D toy
def test_toy_exact_velocity_transports_noise_to_the_mixture():
    g = torch.Generator().manual_seed(0)
    gm = toy2d.GaussianMixture2D.default()
    x = toy2d.euler_sample(gm.velocity, 3000, steps=200, generator=g)
    ref = gm.sample(3000, generator=g)
    wrong = toy2d.GaussianMixture2D(gm.means * 0.5, gm.stds, gm.weights).sample(3000, generator=g)
    assert toy2d.energy_distance(x, ref) < 0.01 < toy2d.energy_distance(wrong, ref)


def test_toy_importance_resampling_matches_the_closed_form_tilt():
    g = torch.Generator().manual_seed(1)
    gm = toy2d.GaussianMixture2D.default()
    exact = gm.tilted_linear(torch.tensor([1.0, 0.0]), beta=0.5).sample(3000, generator=g)
    resampled = toy2d.sample_tilted(gm, toy2d.linear_reward((1.0, 0.0)), beta=0.5, n=3000, generator=g)
    other_beta = gm.tilted_linear(torch.tensor([1.0, 0.0]), beta=2.0).sample(3000, generator=g)
    assert toy2d.energy_distance(exact, resampled) < 0.01
    assert toy2d.energy_distance(exact, other_beta) > 5 * toy2d.energy_distance(exact, resampled)


def test_oracle_never_fails_on_arbitrary_pixels():
    """Generated images can be anything; the judge must score them, in [0, 1], without crashing."""
    rng = np.random.default_rng(0)
    for i in range(200):
        kind = i % 4
        if kind == 0:
            img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        elif kind == 1:
            img = (rng.random((32, 32, 3)) > 0.7).astype(np.uint8) * rng.integers(0, 256, 3, dtype=np.uint8)
        elif kind == 2:
            img = np.full((32, 32, 3), rng.integers(0, 256, 3), np.uint8)
            img[8:20, 5:9] = rng.integers(0, 256, 3)
        else:
            img = to_uint8(np.clip(render_image("red circle", i) + rng.normal(0, 0.4, (32, 32, 3)), 0, 1))
        for prompt in ("red circle", "two blue squares", "cyan cross above green triangle"):
            j = judge_image(img, prompt)
            assert 0.0 <= j.TA <= 1.0 and 0.0 <= j.VQ <= 1.0
    video = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    j = judge_video(video, "red circle moving left")
    assert 0.0 <= j.MQ <= 1.0 and 0.0 <= j.TA <= 1.0


def test_video_oracle_is_the_same_in_every_process_when_colours_tie():
    """Half the frames red, half blue: the clip's colour is a tie, decided the same way whatever the hash seed."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json, numpy as np; from genalign.world.render import render_video; "
            "from genalign.world.oracle import judge; "
            "v = np.concatenate([render_video('red circle moving left', 3)[:4], "
            "render_video('blue circle moving left', 3)[4:]]); "
            "print(json.dumps([judge(v, p).as_dict() for p in ('red circle moving left', 'blue circle moving left')]))")
    outs = set()
    for hash_seed in ("0", "1", "2", "3", "4", "5"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        outs.add(out.stdout.strip())
    assert len(outs) == 1
    red, blue = json.loads(outs.pop())
    assert red["TA"] > blue["TA"]  # the tie goes to the colour seen first


def test_judge_many_in_worker_processes_equals_judging_one_at_a_time():
    """Pair sets judge their samples in a process pool (the oracle is the slow step next to GPU sampling); the
    judgements must be the serial ones, in order, for images and videos alike."""
    import math

    from genalign.world.oracle import judge, judge_many

    rng = np.random.default_rng(0)
    prompts = ["red circle", "two blue squares", "cyan cross above green triangle", "yellow triangle"] * 3
    images = [to_uint8(np.clip(render_image(p, i) + rng.normal(0, 0.1 * (i % 3), (32, 32, 3)), 0, 1))
              for i, p in enumerate(prompts)]
    videos = [render_video(p, i)[:6] for i, p in enumerate(["red circle moving left", "blue square moving up"] * 2)]

    def plain(j):  # NaN-free comparison: the oracle reports NaN for what it does not measure
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in {**j.as_dict(), **j.details}.items()}

    for samples, ps in ((images, prompts), (videos, ["red circle moving left", "blue square moving up"] * 2)):
        serial = [plain(judge(s, p)) for s, p in zip(samples, ps)]
        pooled = judge_many(samples, ps, workers=2, min_per_worker=1)
        assert [plain(j) for j in pooled] == serial
        assert len({str(sorted(j.items())) for j in serial}) > 1  # the samples are judged differently
    assert [plain(j) for j in judge_many(images[:3], prompts[:3], workers=8)] == [
        plain(judge(s, p)) for s, p in zip(images[:3], prompts[:3])]  # too few for processes: judged here
