"""Reward-model training (genalign.trainers.reward) and evaluation (genalign.eval.reward_eval), on CPU with the
tiny reward models and small preference sets made from the world's renderer and annotators."""

import json
import math
import random

import numpy as np
import pytest
import torch
from genalign.rewards import RewardModel, load_reward_model

from genalign.config import ConfigError, load_config
from genalign.data import PreferencePair, load_preference_pairs
from genalign.eval.reward_eval import eval_reward_main, evaluate_reward, score_main
from genalign.losses.reward import btt_loss
from genalign.recipes import recipe_path
from genalign.trainers.reward import (
    PreloadedPairs,
    RewardTrainConfig,
    RewardTrainer,
    build_reward_model,
    random_shift,
)
from genalign.trainers.reward import main as train_main
from genalign.world.annotators import (
    Annotator,
    label_video_pairs,
    png_bytes,
    write_pickapic_parquet,
    write_videoalign_csv,
)
from genalign.world.grammar import COLORS, DIRECTIONS, SHAPES
from genalign.world.render import flicker_video, jitter_video, render_image, render_video, to_uint8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def quiet(**kw):
    return dict(progress_bar=False, report_to="none", num_threads=1, **kw)


# ------------------------------------------------------------------------------------------ data
def pickapic_rows(n: int, seed: int, noise: float) -> list[dict]:
    """Pairs of one prompt ("red circle"): the render of the prompt against the render of the prompt with another
    colour (a miscaption), on the same layout; A / B at random. The oracle label is the correct render; the
    annotators' label is noisy (with probability `noise` one of the two other labels)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        other = rng.choice([c for c in COLORS if c != color])
        prompt = f"{color} {shape}"
        good = to_uint8(render_image(prompt, seed * 10_000 + i))
        bad = to_uint8(render_image(f"{other} {shape}", seed * 10_000 + i))
        a_wins = rng.random() < 0.5
        truth = 1.0 if a_wins else 0.0
        label = truth if rng.random() >= noise else rng.choice([x for x in (1.0, 0.0, 0.5) if x != truth])
        a, b = (good, bad) if a_wins else (bad, good)
        rows.append({"caption": prompt, "jpg_0": png_bytes(a), "jpg_1": png_bytes(b), "label_0": label,
                     "label_1": 1.0 - label, "oracle_label": "A" if a_wins else "B"})
    return rows


@pytest.fixture(scope="module")
def pickapic(tmp_path_factory):
    root = tmp_path_factory.mktemp("pickapic")
    train = write_pickapic_parquet(pickapic_rows(160, seed=1, noise=0.1), root / "train.parquet")
    heldout = write_pickapic_parquet(pickapic_rows(64, seed=2, noise=0.1), root / "heldout.parquet")
    return train, heldout


@pytest.fixture(scope="module")
def videoalign(tmp_path_factory):
    """A tiny VideoAlign CSV labelled by the world's annotators: a clean clip against a flickering (visual
    quality) or jittering (motion quality) one of the same prompt."""
    root = tmp_path_factory.mktemp("videoalign")
    rng = random.Random(0)
    a, b, prompts = [], [], []
    for i in range(12):
        prompt = f"{rng.choice(list(COLORS))} {rng.choice(SHAPES)} moving {rng.choice(DIRECTIONS[:4])}"
        clean = render_video(prompt, i)
        flawed = flicker_video(clean, np.random.default_rng(i)) if i % 2 else jitter_video(prompt, i, 2.5)
        pair = (to_uint8(clean), to_uint8(flawed))
        if rng.random() < 0.5:
            pair = pair[::-1]
        a.append(pair[0])
        b.append(pair[1])
        prompts.append(prompt)
    rows = label_video_pairs(np.stack(a), np.stack(b), prompts, Annotator(noise=0.0), root)
    return write_videoalign_csv(rows, root / "pairs.csv")


# ------------------------------------------------------------------------------------------ pickscore
@pytest.fixture(scope="module")
def trained_pickscore(pickapic, tmp_path_factory):
    train, heldout = pickapic
    out = tmp_path_factory.mktemp("run") / "pickscore"
    cfg = RewardTrainConfig(kind="pickscore", model="tiny", data=str(train), eval_data=str(heldout),
                            output_dir=str(out), max_steps=40, batch_size=16, lr=1e-3, log_every=10,
                            checkpoint_every=0, normalization_pairs=0, **quiet())
    trainer = RewardTrainer.from_config(cfg)
    before = evaluate_reward(trainer.model, str(heldout))["dimensions"]["score"]["accuracy_without_ties"]
    result = trainer.train()
    return trainer, result, before


def test_pickscore_reward_learns_to_tell_the_right_render_on_heldout_pairs(trained_pickscore):
    trainer, result, before = trained_pickscore
    score = trainer.eval_result["dimensions"]["score"]
    assert result.step == 40 and result.final_model_dir.name == "reward_model"
    assert abs(before - 0.5) < 0.2  # random init: about chance
    assert score["accuracy_without_ties"] > 0.8 > score["chance_without_ties"] + 0.25
    assert score["accuracy_with_ties"] > score["chance_with_ties"] + 0.2
    # the world's parquet carries the noise-free label: the ceiling is what 10% annotator noise leaves
    assert 0.85 < score["ceiling_without_ties"] < 1.0
    report = json.loads((result.output_dir / "eval" / "reward_eval.json").read_text())
    assert report["dimensions"]["score"]["accuracy_without_ties"] == pytest.approx(score["accuracy_without_ties"])
    assert (result.output_dir / "eval" / "reward_eval.png").stat().st_size > 1000
    logged = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged[0]["loss"] > logged[-2]["loss"]  # the last record is the evaluation
    assert logged[-1]["eval/score/accuracy_without_ties"] == pytest.approx(score["accuracy_without_ties"])


def test_saved_reward_model_reloads_and_scores_identically_with_its_normalisation(trained_pickscore, pickapic):
    trainer, result, _ = trained_pickscore
    loaded = load_reward_model(result.final_model_dir)
    stats = loaded.normalization["score"]
    assert stats != {"mean": 0.0, "std": 1.0} and stats == trainer.model.normalization["score"]
    pairs = load_preference_pairs(str(pickapic[0]), tie_policy="half")
    media = [pairs[i].media_a for i in range(len(pairs))] + [pairs[i].media_b for i in range(len(pairs))]
    prompts = pairs.prompts * 2
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(media, prompts)
        got = loaded(media, prompts)
        raw = loaded(media, prompts, normalize=False)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(got, (raw - stats["mean"]) / stats["std"], atol=1e-5)
    # fitted on the training media (normalization_pairs=0: all of them): about N(0, 1) there
    assert abs(float(got.mean())) < 1e-4 and abs(float(got.std(unbiased=False)) - 1) < 1e-4


def brute_force_accuracies(delta: list[float], labels: list[float]) -> tuple[float, float]:
    """Accuracy without ties (C / (C + D + T_model) over human-decided pairs) and the best Ties-Matter accuracy
    over every threshold, written out plainly."""
    decided = [(d, y) for d, y in zip(delta, labels) if y in (0.0, 1.0)]
    right = sum((d > 0 and y == 1.0) or (d < 0 and y == 0.0) for d, y in decided)
    without = right / len(decided)
    thresholds = [0.0] + [abs(d) + 1e-9 for d in delta]
    best = 0.0
    for eps in thresholds:
        hits = 0
        for d, y in zip(delta, labels):
            predicted = 0.5 if abs(d) < eps else (1.0 if d > 0 else 0.0 if d < 0 else None)
            hits += predicted == y
        best = max(best, hits / len(delta))
    return without, best


def test_eval_reward_command_matches_accuracies_computed_independently(trained_pickscore, pickapic, tmp_path,
                                                                       capsys):
    _, result, _ = trained_pickscore
    heldout = pickapic[1]
    assert eval_reward_main(["--model", str(result.final_model_dir), "--data", str(heldout),
                             "--out", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr().out
    assert "score" in printed and "ceil" in printed
    report = json.loads((tmp_path / "ev" / "reward_eval.json").read_text())["dimensions"]["score"]

    import pyarrow.parquet as pq

    table = pq.read_table(heldout).to_pydict()
    model = load_reward_model(result.final_model_dir)
    from genalign.data.media import decode_image

    with torch.no_grad():
        sa = model([decode_image(x) for x in table["jpg_0"]], table["caption"])
        sb = model([decode_image(x) for x in table["jpg_1"]], table["caption"])
    delta = (sa - sb).tolist()
    without, with_ties = brute_force_accuracies(delta, table["label_0"])
    oracle = [{"A": 1.0, "B": -1.0, "same": 0.0}[x] for x in table["oracle_label"]]
    ceil_without, ceil_with = brute_force_accuracies(oracle, table["label_0"])
    counts = [table["label_0"].count(v) for v in (1.0, 0.0, 0.5)]
    assert report["accuracy_without_ties"] == pytest.approx(without)
    assert report["accuracy_with_ties"] == pytest.approx(with_ties)
    assert report["ceiling_without_ties"] == pytest.approx(ceil_without)
    assert report["ceiling_with_ties"] == pytest.approx(ceil_with)
    assert report["chance_with_ties"] == pytest.approx(max(counts) / len(delta))
    assert report["pairs_with_ties"] == len(delta) and report["pairs_without_ties"] == counts[0] + counts[1]

    # --against: the model compared with itself, every pair the same for both
    assert eval_reward_main(["--model", str(result.final_model_dir), "--data", str(heldout), "--against",
                             str(result.final_model_dir), "--out", str(tmp_path / "vs")]) == 0
    assert "minus --against, vs labels:  +0.0" in capsys.readouterr().out
    versus = json.loads((tmp_path / "vs" / "reward_eval.json").read_text())
    assert versus["paired"]["score"] == {"difference": 0.0, "lo": 0.0, "hi": 0.0, "pairs": counts[0] + counts[1],
                                         "accuracy": pytest.approx(without), "accuracy_other": pytest.approx(without)}
    assert versus["against"]["score"]["accuracy_with_ties"] == pytest.approx(with_ties)
    assert versus["paired_oracle"]["score"]["pairs"] == sum(x != 0.0 for x in oracle)


class BrightnessReward(RewardModel):
    """A stub reward: 255 x the mean pixel value (hand-made cases with known score differences)."""

    kind = "clip"

    def __init__(self):
        super().__init__(("score",))

    def _score_pixels(self, pixels, prompts, fps):
        return {"score": torch.stack([p.float().mean() * 255 for p in pixels])}


def test_evaluate_reward_on_a_hand_made_case():
    # score differences A - B: +40, +10, -30, +2, -5, 0; human labels A, B, B, tie, tie, A
    values = [(140, 100), (110, 100), (70, 100), (102, 100), (95, 100), (100, 100)]
    labels = [1.0, 0.0, 0.0, 0.5, 0.5, 1.0]
    oracle = ["A", "A", "B", "same", "same", "A"]  # wrong on pair 2
    pairs = [PreferencePair("red circle", np.full((4, 4, 3), va, np.uint8), np.full((4, 4, 3), vb, np.uint8), y,
                            meta={"oracle_label": o}) for (va, vb), y, o in zip(values, labels, oracle)]
    m = evaluate_reward(BrightnessReward(), pairs)["dimensions"]["score"]
    # without ties: decided pairs 1 (C), 2 (D), 3 (C), 6 (model tie) -> 2 / 4
    assert m["accuracy_without_ties"] == pytest.approx(0.5)
    assert (m["concordant"], m["discordant"], m["model_ties"]) == (2, 1, 1)
    # with ties: best threshold between 5 and 10 -> pairs 4, 5 are ties for both, 1 and 3 right: 4 / 6
    assert m["accuracy_with_ties"] == pytest.approx(4 / 6) and m["epsilon"] == pytest.approx(7.5, abs=1e-4)
    assert m["chance_without_ties"] == 0.5 and m["chance_with_ties"] == pytest.approx(2 / 6)
    # the oracle as a model: without ties 3 / 4 (pair 2 wrong); with ties 5 / 6 (its ties on 4 and 5 count)
    assert m["ceiling_without_ties"] == pytest.approx(0.75) and m["ceiling_with_ties"] == pytest.approx(5 / 6)
    # data without oracle labels: no ceiling
    for p in pairs:
        p.meta = {}
    assert "ceiling_without_ties" not in evaluate_reward(BrightnessReward(), pairs)["dimensions"]["score"]


class DarknessReward(BrightnessReward):
    """The stub reversed: prefers the darker picture."""

    def _score_pixels(self, pixels, prompts, fps):
        return {"score": -super()._score_pixels(pixels, prompts, fps)["score"]}


def test_paired_comparison_of_two_reward_models_on_a_hand_made_case():
    # score differences A - B of the brightness stub: +40, +10, -30, +2, -5, 0, +20; the darkness stub's: negated
    values = [(140, 100), (110, 100), (70, 100), (102, 100), (95, 100), (100, 100), (120, 100)]
    labels = [1.0, 0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    oracle = ["A", "B", "A", "same", "A", "A", "B"]
    pairs = [PreferencePair("red circle", np.full((4, 4, 3), va, np.uint8), np.full((4, 4, 3), vb, np.uint8), y,
                            meta={"oracle_label": o}) for (va, vb), y, o in zip(values, labels, oracle)]
    result = evaluate_reward(BrightnessReward(), pairs, against=DarknessReward())
    # decided labels: pairs 1, 2, 3, 6, 7. Brightness right on 1, 3, 7; darkness on 2; neither on 6 (a model tie)
    # per pair, brightness minus darkness: +1, -1, +1, 0, +1 -> mean 0.4, sample variance 0.8
    paired = result["paired"]["score"]
    half = 1.96 * np.sqrt(0.8) / np.sqrt(5)
    assert paired["pairs"] == 5 and paired["difference"] == pytest.approx(0.4)
    assert (paired["lo"], paired["hi"]) == (pytest.approx(0.4 - half), pytest.approx(0.4 + half))
    assert (paired["accuracy"], paired["accuracy_other"]) == (pytest.approx(0.6), pytest.approx(0.2))
    # the same accuracies as each model's own evaluation
    assert result["dimensions"]["score"]["accuracy_without_ties"] == pytest.approx(0.6)
    assert result["against"]["score"]["accuracy_without_ties"] == pytest.approx(
        evaluate_reward(DarknessReward(), pairs)["dimensions"]["score"]["accuracy_without_ties"]) == 0.2
    # against the oracle's labels: decided 1, 2, 3, 5, 6, 7; brightness right on 1; darkness on 2, 3, 5, 7
    oracle_paired = result["paired_oracle"]["score"]
    assert oracle_paired["pairs"] == 6 and oracle_paired["difference"] == pytest.approx((1 - 4) / 6)
    # a model without the dimensions compared is refused
    with pytest.raises(ValueError, match="no dimension score"):
        evaluate_reward(BrightnessReward(), pairs, dims={"score": "overall"}, against=MultiDimStub())


class MultiDimStub(BrightnessReward):
    def __init__(self):
        RewardModel.__init__(self, ("VQ", "TA"))


# ------------------------------------------------------------------------------------------ videoreward
def test_videoreward_trains_on_a_videoalign_csv_with_per_dimension_labels(videoalign, tmp_path):
    cfg = RewardTrainConfig(kind="videoreward", model="tiny", data=str(videoalign), output_dir=str(tmp_path / "run"),
                            max_steps=24, batch_size=4, lr=3e-4, log_every=1, checkpoint_every=0, preload=True,
                            normalization_pairs=4, lora_rank=0, **quiet())
    trainer = RewardTrainer.from_config(cfg)
    full = trainer.collate_fn(list(trainer.train_dataset))  # all 12 pairs, per-dimension labels as read
    assert set(full["labels"]) == {"VQ", "MQ", "TA"} and full["fps_a"][0] == 8.0

    def dataset_loss():
        trainer.model.eval()
        with torch.no_grad():
            loss, metrics = trainer.compute_loss(full)
        # the loss is BTT on the per-dimension labels, not on the overall label
        media = list(full["media_a"]) + list(full["media_b"])
        raw = trainer.model(media, full["prompt"] * 2, normalize=False)
        scores = torch.stack([raw[d] for d in ("VQ", "MQ", "TA")], 1)
        label = torch.stack([full["labels"][d] for d in ("VQ", "MQ", "TA")], 1)
        expected, _ = btt_loss(scores[:12], scores[12:], label, theta=5.0)
        overall, _ = btt_loss(scores[:12], scores[12:], full["label"], theta=5.0)
        assert float(loss) == pytest.approx(float(expected), rel=1e-5)
        assert abs(float(overall) - float(expected)) > 1e-4
        return float(loss), metrics

    before, metrics = dataset_loss()
    assert {"loss/VQ", "loss/MQ", "loss/TA", "accuracy/VQ"} <= set(metrics)
    result = trainer.train()
    after, _ = dataset_loss()
    assert after < before - 0.1
    # saved with its training fps and frame count; scores reload identically
    loaded = load_reward_model(result.final_model_dir)
    assert loaded.training_fps == 8.0 and loaded.config.num_frames == 8
    trainer.model.eval()
    with torch.no_grad():
        a = trainer.model(list(full["media_a"][:3]), full["prompt"][:3])
        b = loaded(list(full["media_a"][:3]), full["prompt"][:3])
    for d in ("VQ", "MQ", "TA", "Overall"):
        assert torch.allclose(a[d], b[d], atol=1e-5)
    # per-dimension evaluation with the oracle columns of the CSV as ceiling (noise-free annotators: 100%)
    report = evaluate_reward(loaded, str(videoalign))["dimensions"]
    assert set(report) == {"VQ", "MQ", "TA", "Overall"}
    assert report["MQ"]["ceiling_with_ties"] == 1.0 and report["Overall"]["label"] == "overall"


def test_preloading_video_pairs_in_threads_keeps_order_and_names_a_broken_file(videoalign, tmp_path):
    import shutil

    from genalign.data import DataError

    dataset = load_preference_pairs(str(videoalign), tie_policy="half")
    threaded, sequential = PreloadedPairs(dataset, workers=3).pairs, PreloadedPairs(dataset, workers=1).pairs
    assert [p.source for p in threaded] == [dataset.record_info(i)["source"] for i in range(len(dataset))]
    for i, (a, b) in enumerate(zip(threaded, sequential)):
        assert a.prompt == b.prompt and a.labels == b.labels
        assert np.array_equal(a.media_a, b.media_a) and np.array_equal(a.media_b, b.media_b)
        assert np.array_equal(a.media_a, dataset[i].media_a) and np.array_equal(a.media_b, dataset[i].media_b)
    # clips named by several rows (K samples per prompt): each file decoded once, the rows share it
    import csv

    with open(videoalign, newline="") as f:
        rows = list(csv.DictReader(f))[:3]
    shared = [rows[0], {**rows[1], "path_A": rows[0]["path_A"]}, {**rows[2], "path_A": rows[0]["path_B"],
                                                                   "path_B": rows[0]["path_A"]}]
    with open(videoalign.parent / "shared.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(shared)
    reused = load_preference_pairs(str(videoalign.parent / "shared.csv"), tie_policy="half")
    preloaded = PreloadedPairs(reused, workers=2)
    assert preloaded.files_decoded == 3  # 6 media, 3 files
    for i, pair in enumerate(preloaded.pairs):
        assert np.array_equal(pair.media_a, reused[i].media_a) and np.array_equal(pair.media_b, reused[i].media_b)
    assert preloaded.pairs[2].media_b is preloaded.pairs[0].media_a
    # a clip that became unreadable after the CSV was checked: the load stops with the row and column
    root = tmp_path / "copy"
    shutil.copytree(videoalign.parent, root)
    broken = load_preference_pairs(str(root / "pairs.csv"), tie_policy="half")
    (root / broken.records[5].b.path.relative_to(root)).write_bytes(b"not an mp4")
    with pytest.raises(DataError, match=r"pairs.csv.*row 5|row 5.*pairs.csv") as err:
        PreloadedPairs(broken, workers=3)
    assert "path_b" in str(err.value).lower()


def test_zero_weight_dimensions_are_left_out_of_the_loss(videoalign, tmp_path):
    cfg = RewardTrainConfig(kind="videoreward", model="tiny", data=str(videoalign), output_dir=str(tmp_path / "r"),
                            max_steps=1, batch_size=4, dims={"VQ": 1, "MQ": 1, "TA": 0}, **quiet())
    trainer = RewardTrainer.from_config(cfg)
    batch = trainer.collate_fn([trainer.train_dataset[i] for i in range(4)])
    assert torch.isnan(batch["labels"]["TA"]).all() and not torch.isnan(batch["labels"]["VQ"]).any()
    _, metrics = trainer.compute_loss(batch)
    assert math.isnan(float(metrics["loss/TA"])) and not math.isnan(float(metrics["loss/VQ"]))


def test_random_shift_translates_with_edge_padding_and_moves_video_frames_alike():
    torch.manual_seed(0)
    image = torch.rand(3, 8, 8)
    video = torch.rand(4, 3, 8, 8)
    seen = set()
    for seed in range(40):
        shifted_image, shifted_video = random_shift([image, video], 2, torch.Generator().manual_seed(seed))
        generator = torch.Generator().manual_seed(seed)  # the shifts drawn, in the same order
        (dx, dy), (vx, vy) = (torch.randint(-2, 3, (2,), generator=generator).tolist() for _ in range(2))
        seen.add((dx, dy))
        # reference: numpy's edge padding, then the window moved by (dx, dy)
        padded = np.pad(image.numpy(), ((0, 0), (2, 2), (2, 2)), mode="edge")
        np.testing.assert_array_equal(shifted_image.numpy(), padded[:, 2 + dy:10 + dy, 2 + dx:10 + dx])
        padded = np.pad(video.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)), mode="edge")
        np.testing.assert_array_equal(shifted_video.numpy(), padded[..., 2 + vy:10 + vy, 2 + vx:10 + vx])
    assert len(seen) > 10 and (0, 0) in seen  # every shift in [-2, 2]^2 is drawn, none is forced


# ------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize(("kind", "augment_shift"), [("pickscore", 0), ("videoreward", 0), ("pickscore", 2),
                                                      ("videoreward", 2)])
def test_reward_trainer_resume_is_exact(kind, augment_shift, pickapic, videoalign, tmp_path):
    data = str(pickapic[0]) if kind == "pickscore" else str(videoalign)
    common = dict(kind=kind, model="tiny", data=data, max_steps=6, batch_size=4, lr=1e-3, lr_scheduler="cosine",
                  checkpoint_every=3, normalization_pairs=4, weight_decay=0.01, **quiet())
    # the pairs are read once (MP4 decoding is the slow part here); each trainer builds its model from the config
    pairs = load_preference_pairs(data, tie_policy="half")
    if kind == "videoreward":
        pairs = PreloadedPairs(pairs)

    def trainer(output_dir, shift=augment_shift, **kw):
        cfg = RewardTrainConfig(output_dir=str(tmp_path / output_dir), augment_shift=shift, **common, **kw)
        return RewardTrainer(build_reward_model(cfg), cfg, pairs)

    straight = trainer("a")
    straight.train()
    first = trainer("b")
    assert first.train(stop_at_step=3).step == 3
    resumed = trainer("b", resume="latest")
    assert resumed.train().step == 6
    a, b = dict(straight.named_trainable), dict(resumed.named_trainable)
    assert a.keys() == b.keys() and len(a) > 0
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    if augment_shift:  # the shifts reach the loss: the same run without them ends elsewhere
        unshifted = trainer("c", shift=0)
        unshifted.train()
        c = dict(unshifted.named_trainable)
        assert max((a[k] - c[k]).abs().max().item() for k in a) > 1e-4


# ------------------------------------------------------------------------------------------ commands
def test_score_command_prints_a_table_and_writes_json(trained_pickscore, tmp_path, capsys):
    from genalign.media import save_png

    _, result, _ = trained_pickscore
    folder = tmp_path / "imgs"
    images = [to_uint8(render_image(p, 0)) for p in ("red circle", "blue circle", "green square")]
    for i, im in enumerate(images):
        save_png(folder / f"{i}.png", im)
    out = tmp_path / "scores.json"
    assert score_main([str(folder), "--prompt", "red circle", "--model", str(result.final_model_dir),
                       "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(f"{i}.png" in printed for i in range(3)) and "normalised" in printed
    rows = json.loads(out.read_text())["scores"]
    model = load_reward_model(result.final_model_dir)
    with torch.no_grad():
        expected = model(images, "red circle")
    assert [r["score"] for r in rows] == pytest.approx(expected.tolist(), abs=1e-5)


def one_error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(prog)]
    assert len(lines) == 1, err
    return lines[0]


def test_score_and_eval_reward_errors_are_one_line_naming_the_file(trained_pickscore, videoalign, pickapic,
                                                                   tmp_path, capsys):
    from genalign.media import save_png

    _, result, _ = trained_pickscore
    model_dir = str(result.final_model_dir)
    good = save_png(tmp_path / "good.png", to_uint8(render_image("red circle", 0)))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")

    assert score_main([str(good), str(broken), "--prompt", "red circle", "--model", model_dir]) == 2
    assert "broken.png" in one_error_line(capsys, "genalign score")

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red circle\nblue square\ngreen cross\n")
    assert score_main([str(good), str(good), "--prompts", str(prompts), "--model", model_dir]) == 2
    line = one_error_line(capsys, "genalign score")
    assert "2 media files but 3 prompts" in line and "prompts.txt" in line

    assert score_main([str(good), "--prompt", "red circle", "--model", model_dir, "--kind", "videoreward"]) == 2
    line = one_error_line(capsys, "genalign score")
    assert model_dir in line and "'clip'" in line

    not_a_reward = tmp_path / "lora"
    not_a_reward.mkdir()
    (not_a_reward / "weights.safetensors").write_bytes(b"")
    assert score_main([str(good), "--prompt", "red circle", "--model", str(not_a_reward)]) == 2
    assert str(not_a_reward) in one_error_line(capsys, "genalign score")

    assert eval_reward_main(["--model", model_dir, "--data", str(tmp_path / "missing.parquet"),
                             "--out", str(tmp_path / "ev")]) == 2
    assert "missing.parquet" in one_error_line(capsys, "genalign eval-reward")
    assert eval_reward_main(["--model", model_dir, "--data", str(pickapic[1]), "--against", str(tmp_path / "nope"),
                             "--out", str(tmp_path / "ev")]) == 2
    assert "--against" in one_error_line(capsys, "genalign eval-reward")

    # training a kind from a reward folder of another kind
    assert train_main(["--kind", "videoreward", f"data={videoalign}", f"model={model_dir}",
                       f"output_dir={tmp_path / 'x'}", "progress_bar=false", "report_to=none"]) == 2
    line = one_error_line(capsys, "genalign train reward")
    assert model_dir in line and "video_reward" in line


def test_pickscore_kind_trains_with_the_btt_loss_when_asked(pickapic, tmp_path):
    """loss=btt theta=3 for a CLIP reward: the trainer's loss is BTT on the score difference of each pair."""
    train, _ = pickapic
    cfg = RewardTrainConfig(kind="pickscore", model="tiny", data=str(train), output_dir=str(tmp_path / "run"),
                            loss="btt", theta=3.0, max_steps=2, batch_size=8, checkpoint_every=0,
                            normalization_pairs=0, **quiet())
    trainer = RewardTrainer.from_config(cfg)
    batch = trainer.collate_fn([trainer.train_dataset[i] for i in range(8)])
    with torch.no_grad():
        loss, _ = trainer.compute_loss(batch)
        scores = trainer.model(list(batch["media_a"]) + list(batch["media_b"]), list(batch["prompt"]) * 2,
                               normalize=False)
    expected, _ = btt_loss(scores[:8], scores[8:], batch["label"], theta=3.0)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert (batch["label"] == 0.5).any()  # the ties of the world's pairs reach the loss


def test_recipes_load_and_bad_keys_are_named():
    for kind in ("pickscore", "videoreward"):
        cfg = load_config(RewardTrainConfig, recipe_path(f"reward_{kind}_world"), ["data=pairs"])
        assert cfg.kind == kind and cfg.tie_policy == "half" and cfg.model == "world"
    assert load_config(RewardTrainConfig, recipe_path("reward_videoreward_world"), ["data=x"]).loss == "btt"
    with pytest.raises(ConfigError, match="kind=pickscore trains with pickscore or btt, got 'bt'"):
        RewardTrainConfig(kind="pickscore", loss="bt")
    with pytest.raises(ConfigError, match="lora_rank"):
        RewardTrainConfig(kind="pickscore", lora_rank=8)
    with pytest.raises(ConfigError, match="theta"):
        RewardTrainConfig(kind="videoreward", theta=1.0)
    with pytest.raises(ConfigError, match="tie_polcy"):
        load_config(RewardTrainConfig, None, ["tie_polcy=half"])
    with pytest.raises(ConfigError, match="clip_image_tower"):
        RewardTrainConfig(kind="pickscore", clip_image_tower="convnext")
    with pytest.raises(ConfigError, match="clip_resnet_layers"):
        load_config(RewardTrainConfig, None, ["clip_resnet_layers=1,1,1"])
    assert load_config(RewardTrainConfig, None, ["clip_resnet_layers=2,1,1,1"]).clip_resnet_layers == [2, 1, 1, 1]


def test_a_world_clip_with_a_resnet_image_tower_learns_the_renders_and_reloads(pickapic, tmp_path):
    """model=world clip_image_tower=resnet: an open_clip CLIP (ModifiedResNet image tower, the world's tokenizer)
    trained by the same trainer, saved in open_clip's local-dir layout with its tokenizer, reloaded exactly."""
    train, heldout = pickapic
    cfg = RewardTrainConfig(kind="pickscore", model="world", clip_image_tower="resnet", clip_resnet_width=8,
                            clip_width=32, clip_layers=2, clip_heads=2, clip_projection_dim=16, data=str(train),
                            eval_data=str(heldout), output_dir=str(tmp_path / "run"), max_steps=80, batch_size=16,
                            lr=1e-3, log_every=10, checkpoint_every=0, normalization_pairs=0, **quiet())
    trainer = RewardTrainer.from_config(cfg)
    assert type(trainer.model.clip.visual).__name__ == "ModifiedResNet"
    result = trainer.train()
    assert trainer.eval_result["dimensions"]["score"]["accuracy_without_ties"] > 0.8
    folder = result.final_model_dir
    assert {"open_clip_config.json", "open_clip_model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    reloaded = load_reward_model(folder)
    pairs = load_preference_pairs(str(heldout), tie_policy="half")
    media = [pairs[i].media_a for i in range(8)]
    prompts = [pairs[i].prompt for i in range(8)]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(media, prompts), trainer.model.eval()(media, prompts))


def test_videoreward_from_a_qwen2vl_folder_uses_lora_or_saves_the_fully_trained_backbone(tmp_path):
    from genalign.rewards import build_tiny_qwen2vl_tokenizer, tiny_qwen2vl_backbone

    base = tmp_path / "qwen2vl"
    tokenizer = build_tiny_qwen2vl_tokenizer()
    tiny_qwen2vl_backbone(tokenizer, seed=0).save_pretrained(base)
    tokenizer.save_pretrained(base)
    video = [to_uint8(render_video("red circle moving left", 0))]

    lora = build_reward_model(RewardTrainConfig(kind="videoreward", model=str(base), train_vision=False))
    assert lora.uses_lora and lora.config.lora_rank == 16 and lora.config.base_model_path == str(base.resolve())
    trained = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or n.startswith("head.") for n in trained)
    lora.save_pretrained(tmp_path / "lora_reward")
    assert not (tmp_path / "lora_reward" / "backbone").exists()  # refers to the base folder instead

    full = build_reward_model(RewardTrainConfig(kind="videoreward", model=str(base), lora_rank=0))
    assert not full.uses_lora
    with torch.no_grad():  # stands for training: the language model's own weights change
        full.base_model.language_model.layers[0].mlp.down_proj.weight.add_(0.05)
    full.save_pretrained(tmp_path / "full_reward")  # without LoRA the backbone must be saved, base path or not
    assert (tmp_path / "full_reward" / "backbone").is_dir()
    full.eval()
    with torch.no_grad():
        expected = full(video, "red circle moving left")["Overall"]
        got = load_reward_model(tmp_path / "full_reward")(video, "red circle moving left")["Overall"]
    assert torch.allclose(got, expected, atol=1e-5)


def test_ensemble_reward_command_saves_a_fitted_ensemble_that_scores_and_evaluates(trained_pickscore, pickapic,
                                                                                   tmp_path, capsys):
    from genalign.rewards import EnsembleReward, tiny_clip_reward, tiny_video_reward

    from genalign.cli import main as cli_main

    _, result, _ = trained_pickscore
    train, heldout = pickapic
    first = str(result.final_model_dir)
    second = str(tiny_clip_reward(seed=5).save_pretrained(tmp_path / "second"))
    out = tmp_path / "ensemble"
    assert cli_main(["ensemble-reward", first, second, "--weights", "2,1", "--kind", "pickscore",
                     "--fit-data", str(train), "--fit-pairs", "40", "--fit-seed", "3", "--out", str(out)]) == 0
    assert "the mean of 2 clip reward models" in capsys.readouterr().out
    ensemble = load_reward_model(out)
    assert isinstance(ensemble, EnsembleReward) and ensemble.weights == pytest.approx([2 / 3, 1 / 3])

    # its normalisation: mean 0 / std 1 over the media of 40 training pairs drawn as the trainer draws them with
    # seed 3; raw = the members' mix
    pairs = load_preference_pairs(train, tie_policy="half")
    drawn = sorted(random.Random(3).sample(range(len(pairs)), 40))
    media = [pairs[i].media_a for i in drawn] + [pairs[i].media_b for i in drawn]
    prompts = [pairs[i].prompt for i in drawn] * 2
    members = [load_reward_model(first), load_reward_model(second)]
    with torch.no_grad():
        mix = 2 / 3 * members[0](media, prompts) + 1 / 3 * members[1](media, prompts)
        scores = ensemble(media, prompts)
    assert torch.allclose(ensemble(media, prompts, normalize=False), mix, atol=1e-5)
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert scores.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert eval_reward_main(["--model", str(out), "--data", str(heldout), "--kind", "pickscore",
                             "--out", str(tmp_path / "ev")]) == 0

    # bad input: one line naming what is wrong, and nothing written
    assert cli_main(["ensemble-reward", first, second, "--out", str(out)]) == 2
    assert "--out" in one_error_line(capsys, "genalign ensemble-reward")
    assert cli_main(["ensemble-reward", first, second, "--kind", "videoreward", "--out", str(tmp_path / "e2")]) == 2
    assert "'clip'" in one_error_line(capsys, "genalign ensemble-reward")
    video = str(tiny_video_reward(seed=1).save_pretrained(tmp_path / "video"))
    assert cli_main(["ensemble-reward", first, video, "--out", str(tmp_path / "e3")]) == 2
    assert "member 1 has dimensions" in one_error_line(capsys, "genalign ensemble-reward")
    assert cli_main(["ensemble-reward", first, second, "--weights", "1,x", "--out", str(tmp_path / "e4")]) == 2
    assert "--weights" in one_error_line(capsys, "genalign ensemble-reward")
    assert cli_main(["ensemble-reward", first, str(tmp_path / "nope"), "--out", str(tmp_path / "e5")]) == 2
    assert "member 1" in one_error_line(capsys, "genalign ensemble-reward")
    assert not any((tmp_path / name).exists() for name in ("e2", "e3", "e4", "e5", "e5.tmp"))
