"""genalign.data: readers (Pick-a-Pic parquet / HF datasets, VideoAlign CSV, jsonl, folders), tie and bad-row
policies, prompt files, and the latent cache (round trip, refusal on mismatch, atomic writes)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from genalign.data import (
    CachedPreferenceDataset,
    CacheMismatchError,
    DataError,
    MediaItem,
    PreferencePair,
    build_cache,
    cache_main,
    load_cache,
    load_preference_pairs,
    load_prompts,
    read_manifest,
    resize_center_crop,
    to_pixels,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# ------------------------------------------------------------------------------------------- helpers
def img(seed: int, h: int = 8, w: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(path: Path, columns: dict, row_group_size: int | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def pickapic_columns(images, labels_0, captions=None, with_label_1=True):
    n = len(labels_0)
    cols = {
        "caption": captions or [f"prompt {i}" for i in range(n)],
        "jpg_0": [png(images[2 * i]) for i in range(n)],
        "jpg_1": [png(images[2 * i + 1]) for i in range(n)],
        "label_0": [float(v) for v in labels_0],
    }
    if with_label_1:
        cols["label_1"] = [1.0 - float(v) for v in labels_0]
    return cols


class FakeAdapter:
    """A tiny stand-in for a FlowAdapter: latents = 2x2 average pool of pixels, prompts -> hash embeddings."""

    family = "fake"

    def __init__(self, name="fake/model", vae_config=None, fail_on_call=None, vae_weight=None):
        vae = SimpleNamespace()
        if vae_weight is not None:  # a real module, so that its weights enter the fingerprint
            vae = torch.nn.Linear(4, 4)
            with torch.no_grad():
                vae.weight.copy_(vae_weight)
                vae.bias.copy_(vae_weight[0])
        vae.config = {"latent_channels": 3, "scaling_factor": 1.0, **(vae_config or {})}
        self.pipe = SimpleNamespace(
            name_or_path=name,
            vae=vae,
            transformer=SimpleNamespace(config={"in_channels": 3, "num_layers": 1}),
        )
        self.pixel_calls = 0
        self.fail_on_call = fail_on_call
        self.seen_shapes = []

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        self.pixel_calls += 1
        if self.fail_on_call is not None and self.pixel_calls >= self.fail_on_call:
            raise RuntimeError("boom: encoder failed midway")
        self.seen_shapes.append(tuple(pixels.shape))
        assert pixels.min() >= -1 and pixels.max() <= 1
        if pixels.ndim == 5:
            return torch.nn.functional.avg_pool3d(pixels, (1, 2, 2))
        return torch.nn.functional.avg_pool2d(pixels, 2)

    def encode_prompt(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled = [], []
        for p in prompts:
            g = torch.Generator().manual_seed(int(hashlib.sha256(p.encode()).hexdigest()[:8], 16))
            embeds.append(torch.randn(4, 6, generator=g))
            pooled.append(torch.randn(5, generator=g))
        return {"prompt_embeds": torch.stack(embeds), "pooled_prompt_embeds": torch.stack(pooled)}


# ------------------------------------------------------------------------------------------- Pick-a-Pic
def test_pickapic_parquet_decodes_png_bytes_exactly_and_maps_labels(tmp_path):
    images = [img(i) for i in range(8)]
    path = write_parquet(tmp_path / "pp.parquet", pickapic_columns(images, [1, 0, 0.5, 1]), row_group_size=2)
    ds = load_preference_pairs(path, tie_policy="half")
    assert len(ds) == 4
    assert ds.labels == [1.0, 0.0, 0.5, 1.0]
    for i in range(4):
        pair = ds[i]
        assert isinstance(pair, PreferencePair)
        assert pair.prompt == f"prompt {i}"
        assert pair.media_a.dtype == np.uint8 and pair.media_a.shape == (8, 8, 3)
        np.testing.assert_array_equal(pair.media_a, images[2 * i])
        np.testing.assert_array_equal(pair.media_b, images[2 * i + 1])
        assert pair.source == f"{path}#{i}"
    s = ds.stats
    assert (s["rows"], s["pairs"], s["a_wins"], s["b_wins"], s["ties"], s["ties_half"]) == (4, 4, 2, 1, 1, 1)
    clone = pickle.loads(pickle.dumps(ds))  # what DataLoader workers get: the parquet file is reopened
    np.testing.assert_array_equal(clone[3].media_b, images[7])
    # indexed like a list: slices, negative indices, iteration that stops at the end
    assert [p.prompt for p in ds[1:4:2]] == ["prompt 1", "prompt 3"]
    np.testing.assert_array_equal(ds[-1].media_a, images[6])
    assert ds[-1].source == f"{path}#3"
    assert [p.prompt for p in ds] == [f"prompt {i}" for i in range(4)]
    with pytest.raises(IndexError):
        ds[4]


def test_truncated_jpeg_is_caught_by_the_header_check(tmp_path):
    def jpeg(arr):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=95)
        return buf.getvalue()

    good, other = jpeg(img(1, 16, 16)), jpeg(img(2, 16, 16))
    cols = {
        "caption": ["ok", "cut"],
        "jpg_0": [good, good[: len(good) - 40]],
        "jpg_1": [other, other],
        "label_0": [1, 1],
    }
    ds = load_preference_pairs(write_parquet(tmp_path / "j.parquet", cols))
    assert len(ds) == 1 and ds.stats["skipped_corrupt_media"] == 1 and "end-of-image" in ds.skipped[0]
    assert ds[0].media_a.shape == (16, 16, 3)
    assert (
        len(load_preference_pairs(tmp_path / "j.parquet", verify="exists")) == 2
    )  # the cheaper check misses it


@pytest.mark.parametrize(
    "policy, labels, counts",
    [
        ("drop", [1.0, 0.0], {"ties": 2, "ties_dropped": 2, "ties_half": 0, "ties_as_a_wins": 0, "pairs": 2}),
        (
            "half",
            [1.0, 0.5, 0.0, 0.5],
            {"ties": 2, "ties_dropped": 0, "ties_half": 2, "ties_as_a_wins": 0, "pairs": 4},
        ),
        (
            "keep_first",
            [1.0, 1.0, 0.0, 1.0],
            {"ties": 2, "ties_dropped": 0, "ties_half": 0, "ties_as_a_wins": 2, "pairs": 4},
        ),
    ],
)
def test_tie_policies_label_and_count_ties(tmp_path, caplog, policy, labels, counts):
    images = [img(i) for i in range(8)]
    path = write_parquet(tmp_path / "pp.parquet", pickapic_columns(images, [1, 0.5, 0, 0.5]))
    with caplog.at_level(logging.INFO, logger="genalign.data"):
        ds = load_preference_pairs(path, tie_policy=policy)
    assert ds.labels == labels
    for k, v in counts.items():
        assert ds.stats[k] == v, k
    assert ds.stats["rows"] == ds.stats["pairs"] + ds.stats["ties_dropped"] + ds.stats["skipped"]
    warned = [r for r in caplog.records if r.name == "genalign.data" and r.levelno == logging.WARNING]
    if policy == "keep_first":
        assert any("2 ties" in r.getMessage() and "keep_first" in r.getMessage() for r in warned)
        assert [ds.record_info(i)["raw_label"] for i in range(4)] == [1.0, 0.5, 0.0, 0.5]
    else:
        assert not warned
    assert any("tie_policy" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_pickapic_paths_are_relative_to_the_parquet_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    images = [img(i, 6, 10) for i in range(4)]
    for i, a in enumerate(images):
        Image.fromarray(a).save(tmp_path / "imgs" / f"{i}.png")
    cols = {
        "caption": ["a", "b"],
        "jpg_0": ["imgs/0.png", "imgs/2.png"],
        "jpg_1": ["imgs/1.png", "imgs/3.png"],
        "label_0": [0, 1],
    }
    ds = load_preference_pairs(write_parquet(tmp_path / "p.parquet", cols))
    assert ds.labels == [0.0, 1.0]
    np.testing.assert_array_equal(ds[1].media_a, images[2])
    np.testing.assert_array_equal(ds[1].media_b, images[3])


def test_hf_dataset_saved_to_disk_and_datasetdict_with_image_feature(tmp_path):
    import datasets

    images = [img(10 + i) for i in range(4)]
    cols = pickapic_columns(images, [0, 1], with_label_1=False)
    datasets.Dataset.from_dict(cols).save_to_disk(str(tmp_path / "saved"))
    ds = load_preference_pairs(tmp_path / "saved")
    assert ds.labels == [0.0, 1.0]
    np.testing.assert_array_equal(ds[0].media_a, images[0])
    np.testing.assert_array_equal(ds[1].media_b, images[3])

    features = datasets.Features(
        {
            "caption": datasets.Value("string"),
            "jpg_0": datasets.Image(),
            "jpg_1": datasets.Image(),
            "label_0": datasets.Value("float32"),
        }
    )
    cells = {
        **cols,
        "jpg_0": [{"bytes": b, "path": None} for b in cols["jpg_0"]],
        "jpg_1": [{"bytes": b, "path": None} for b in cols["jpg_1"]],
    }
    dsd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(cells, features=features)})
    ds2 = load_preference_pairs(dsd)
    assert ds2.labels == [0.0, 1.0]
    np.testing.assert_array_equal(ds2[1].media_a, images[2])


def test_corrupt_image_is_skipped_and_counted_or_raises_with_row_and_column(tmp_path, caplog):
    images = [img(i) for i in range(8)]
    cols = pickapic_columns(images, [1, 0, 1, 0])
    cols["jpg_1"][2] = cols["jpg_1"][2][: len(cols["jpg_1"][2]) // 2]  # truncated PNG
    path = write_parquet(tmp_path / "bad.parquet", cols)
    with caplog.at_level(logging.WARNING, logger="genalign.data"):
        ds = load_preference_pairs(path)
    assert len(ds) == 3 and [ds.record_info(i)["prompt"] for i in range(3)] == [
        "prompt 0",
        "prompt 1",
        "prompt 3",
    ]
    assert ds.stats["skipped"] == 1 and ds.stats["skipped_corrupt_media"] == 1
    assert len(ds.skipped) == 1 and "row 2" in ds.skipped[0] and "'jpg_1'" in ds.skipped[0]
    assert any("row 2" in r.getMessage() and "bad.parquet" in r.getMessage() for r in caplog.records)
    with pytest.raises(DataError) as e:
        load_preference_pairs(path, on_error="raise")
    assert (e.value.row, e.value.column) == (2, "jpg_1")
    assert "bad.parquet" in str(e.value) and "row 2" in str(e.value)


def test_unknown_label_and_inconsistent_label_1_name_the_row(tmp_path):
    images = [img(i) for i in range(6)]
    cols = pickapic_columns(images, [1, 0, 1])
    cols["label_0"][1] = 2.0
    cols["label_1"][1] = -1.0
    cols["label_1"][2] = 0.5  # label_0 = 1 but label_1 = 0.5
    path = write_parquet(tmp_path / "lab.parquet", cols)
    ds = load_preference_pairs(path)
    assert len(ds) == 1 and ds.stats["skipped_bad_label"] == 2
    assert "row 1" in ds.skipped[0] and "'label_0'" in ds.skipped[0] and "2.0" in ds.skipped[0]
    assert "row 2" in ds.skipped[1] and "'label_1'" in ds.skipped[1]
    with pytest.raises(DataError, match=r"row 1.*label_0.*unknown label value 2\.0"):
        load_preference_pairs(path, on_error="raise")


def test_missing_columns_raise_naming_file_and_columns(tmp_path):
    path = write_parquet(tmp_path / "cols.parquet", {"caption": ["x"], "jpg_0": [png(img(0))]})
    with pytest.raises(DataError) as e:
        load_preference_pairs(path)
    msg = str(e.value)
    assert (
        "cols.parquet" in msg
        and "'jpg_1'" in msg
        and "'label_0'" in msg
        and "'caption'" not in msg.split("(")[0]
    )


def test_empty_prompt_is_a_bad_row(tmp_path):
    images = [img(i) for i in range(4)]
    path = write_parquet(tmp_path / "e.parquet", pickapic_columns(images, [1, 0], captions=["ok", "   "]))
    ds = load_preference_pairs(path)
    assert len(ds) == 1 and ds.stats["skipped_empty_prompt"] == 1
    with pytest.raises(DataError, match=r"row 1, column 'caption': empty prompt"):
        load_preference_pairs(path, on_error="raise")


def test_bad_arguments_are_refused(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", pickapic_columns([img(0), img(1)], [1]))
    with pytest.raises(ValueError, match="tie_policy"):
        load_preference_pairs(path, tie_policy="coin")
    with pytest.raises(DataError, match="dims"):
        load_preference_pairs(path, dims={"VQ": 1})
    with pytest.raises(DataError, match="no such file"):
        load_preference_pairs(tmp_path / "nope.parquet")


# ------------------------------------------------------------------------------------------- VideoAlign CSV
def vid(seed: int, frames: int = 8, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)


def write_mp4(path: Path, frames: np.ndarray) -> Path:
    import imageio.v2 as iio

    iio.mimwrite(
        path,
        frames,
        fps=8,
        codec="libx264rgb",
        pixelformat="rgb24",
        macro_block_size=1,
        output_params=["-crf", "0"],
    )
    return path


def write_gif(path: Path, frames: np.ndarray) -> Path:
    ims = [Image.fromarray(f) for f in frames]
    ims[0].save(path, save_all=True, append_images=ims[1:], duration=100, loop=0)
    return path


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    (d / "v").mkdir()
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]], np.uint8)
    vids = {
        "a.mp4": vid(1),
        "b.mp4": vid(2),
        "c.gif": palette[
            np.random.default_rng(3).integers(0, 4, (8, 32, 32))
        ],  # <= 256 colours: exact in GIF
        "frames": vid(4, frames=5),
    }
    write_mp4(d / "v" / "a.mp4", vids["a.mp4"])
    write_mp4(d / "v" / "b.mp4", vids["b.mp4"])
    write_gif(d / "v" / "c.gif", vids["c.gif"])
    (d / "v" / "frames").mkdir()
    for i, f in enumerate(vids["frames"]):  # natural order: 2 before 10
        Image.fromarray(f).save(d / "v" / "frames" / f"f{[0, 1, 2, 10, 11][i]}.png")
    data = (d / "v" / "a.mp4").read_bytes()
    (d / "v" / "trunc.mp4").write_bytes(data[: len(data) // 2])
    return d, vids


def write_csv(path: Path, rows: list[dict]) -> Path:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def va_row(a, b, prompt, vq, mq, ta, fps=8, n=8):
    return {
        "path_A": a,
        "path_B": b,
        "prompt": prompt,
        "VQ": vq,
        "MQ": mq,
        "TA": ta,
        "fps_A": fps,
        "num_frames_A": n,
        "fps_B": fps,
        "num_frames_B": n,
    }


def test_videoalign_csv_reads_videos_exactly_and_votes_labels(video_dir):
    d, vids = video_dir
    rows = [
        va_row("v/a.mp4", "v/b.mp4", "p0", "A", "a", "B"),  # +1 +1 -1 -> A
        va_row("v/c.gif", "v/frames", "p1", "B", "same", "b"),  # -1 0 -1 -> B
        va_row("v/a.mp4", "v/c.gif", "p2", "A", "B", "Same"),  # +1 -1 0 -> tie
        va_row("v/b.mp4", "v/a.mp4", "p3", "same", "same", "same"),  # tie
    ]
    path = write_csv(d / "va.csv", rows)
    ds = load_preference_pairs(path, tie_policy="half")
    assert ds.labels == [1.0, 0.0, 0.5, 0.5]
    assert ds.record_info(0)["labels"] == {"VQ": 1.0, "MQ": 1.0, "TA": 0.0}
    assert ds.record_info(1)["labels"] == {"VQ": 0.0, "MQ": 0.5, "TA": 0.0}
    assert ds.dims == ["VQ", "MQ", "TA"] and ds.kind == "video"
    p0, p1 = ds[0], ds[1]
    assert p0.is_video and p0.media_a.shape == (8, 32, 32, 3)
    np.testing.assert_array_equal(p0.media_a, vids["a.mp4"])
    np.testing.assert_array_equal(p0.media_b, vids["b.mp4"])
    np.testing.assert_array_equal(p1.media_a, vids["c.gif"])
    np.testing.assert_array_equal(p1.media_b, vids["frames"])
    assert p0.meta == {"fps_a": 8, "num_frames_a": 8, "fps_b": 8, "num_frames_b": 8}

    weighted = load_preference_pairs(path, tie_policy="half", dims={"VQ": 2, "MQ": 1, "TA": 1})
    assert weighted.labels == [1.0, 0.0, 1.0, 0.5]  # row 2: 2 - 1 + 0 > 0
    dropped = load_preference_pairs(path)  # default: ties dropped
    assert dropped.labels == [1.0, 0.0] and dropped.stats["ties_dropped"] == 2
    only_ta = load_preference_pairs(path, dims=["TA"], tie_policy="half")
    assert only_ta.labels == [0.0, 0.0, 0.5, 0.5]


def test_videoalign_bad_rows_missing_corrupt_unknown_vote(video_dir):
    d, _ = video_dir
    rows = [
        va_row("v/a.mp4", "v/b.mp4", "good", "A", "A", "A"),
        va_row("v/a.mp4", "v/missing.mp4", "missing", "A", "A", "A"),
        va_row("v/trunc.mp4", "v/b.mp4", "truncated", "A", "A", "A"),
        va_row("v/a.mp4", "v/b.mp4", "bad vote", "A", "C", "A"),
        va_row("v/a.mp4", "v/b.mp4", "", "A", "A", "A"),
    ]
    path = write_csv(d / "bad.csv", rows)
    ds = load_preference_pairs(path)
    s = ds.stats
    assert len(ds) == 1 and ds.prompts == ["good"]
    assert (
        s["skipped_missing_media"],
        s["skipped_corrupt_media"],
        s["skipped_bad_label"],
        s["skipped_empty_prompt"],
    ) == (1, 1, 1, 1)
    assert "row 1 (line 3)" not in ds.skipped[0]  # rows and lines are separate fields
    assert "row 1, line 3, column 'path_B'" in ds.skipped[0] and "missing.mp4" in ds.skipped[0]
    assert "row 2, line 4, column 'path_A'" in ds.skipped[1] and "trunc.mp4" in ds.skipped[1]
    assert "row 3, line 5, column 'MQ'" in ds.skipped[2] and "'C'" in ds.skipped[2]
    with pytest.raises(DataError, match=r"bad\.csv: row 1, line 3, column 'path_B': file not found"):
        load_preference_pairs(path, on_error="raise")
    # a full decode also finds the truncated video
    assert load_preference_pairs(path, verify="decode").stats["skipped_corrupt_media"] == 1


def test_videoalign_blank_cells_leave_a_dimension_unlabelled(video_dir):
    """A blank cell is "not labelled" (out of that dimension's loss and accuracy), not a tie; the overall vote uses
    the labelled dimensions; a row with no weighted dimension labelled is bad."""
    from genalign.rewards import collate_reward_pairs

    d, _ = video_dir
    rows = [
        va_row("v/a.mp4", "v/b.mp4", "only TA", "", "", "A"),
        va_row("v/a.mp4", "v/b.mp4", "VQ and TA", "B", " ", "B"),
        va_row("v/a.mp4", "v/b.mp4", "none", "", "", ""),
    ]
    path = write_csv(d / "blank.csv", rows)
    ds = load_preference_pairs(path, tie_policy="half")
    assert ds.prompts == ["only TA", "VQ and TA"] and ds.labels == [1.0, 0.0]
    assert ds.record_info(0)["labels"] == {"TA": 1.0}
    assert ds.record_info(1)["labels"] == {"VQ": 0.0, "TA": 0.0}
    assert ds.stats["skipped_bad_label"] == 1 and "row 2" in ds.skipped[0] and "no dimension labelled" in ds.skipped[0]
    batch = collate_reward_pairs([ds[0], ds[1]])
    assert "MQ" not in batch["labels"] and torch.isnan(batch["labels"]["VQ"][0])  # NaN: masked in the loss
    assert batch["labels"]["VQ"][1] == 0.0 and batch["labels"]["TA"].tolist() == [1.0, 0.0]
    # weighted dimensions all blank: bad, although another dimension is labelled
    assert load_preference_pairs(path, dims={"MQ": 1}, tie_policy="half").stats["skipped_bad_label"] == 3


def test_videoalign_missing_dimension_column(tmp_path):
    path = write_csv(tmp_path / "x.csv", [{"path_A": "a.mp4", "path_B": "b.mp4", "prompt": "p", "VQ": "A"}])
    with pytest.raises(DataError, match=r"x\.csv: missing required column\(s\) 'MQ', 'TA'"):
        load_preference_pairs(path)
    assert load_preference_pairs(path, dims={"VQ": 1}, verify="none").labels == [1.0]


# ------------------------------------------------------------------------------------- jsonl and folders
def test_jsonl_pairs_keys_labels_and_bad_lines(tmp_path):
    images = [img(20 + i) for i in range(6)]
    for i, a in enumerate(images):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    lines = [
        json.dumps({"prompt": "chosen first", "chosen": "0.png", "rejected": "1.png"}),
        "",
        json.dumps({"prompt": "b wins", "image_a": "2.png", "image_b": "3.png", "label": 0}),
        json.dumps({"prompt": "tie", "media_a": "4.png", "media_b": "5.png", "label": "same"}),
        "{not json",
        json.dumps(
            {
                "prompt": "dims",
                "media_a": "0.png",
                "media_b": "1.png",
                "labels": {"VQ": "B", "TA": "B"},
                "seed": 7,
            }
        ),
        json.dumps({"prompt": "no b", "media_a": "0.png"}),
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    ds = load_preference_pairs(path, tie_policy="half")
    assert ds.prompts == ["chosen first", "b wins", "tie", "dims"]
    assert ds.labels == [1.0, 0.0, 0.5, 0.0]
    np.testing.assert_array_equal(ds[0].media_a, images[0])
    np.testing.assert_array_equal(ds[1].media_b, images[3])
    assert ds.record_info(3)["labels"] == {"VQ": 0.0, "TA": 0.0} and ds[3].meta == {"seed": 7}
    assert ds.stats["skipped"] == 2
    assert "line 5" in ds.skipped[0] and "invalid JSON" in ds.skipped[0]
    assert "line 7" in ds.skipped[1] and "missing media" in ds.skipped[1]

    no_prompt = tmp_path / "np.jsonl"
    no_prompt.write_text(json.dumps({"text": "x", "chosen": "0.png", "rejected": "1.png"}) + "\n")
    with pytest.raises(DataError, match=r"np\.jsonl: missing required column\(s\) 'prompt'"):
        load_preference_pairs(no_prompt)


def test_folder_layout_pairs_by_name_or_all_combinations(tmp_path):
    root = tmp_path / "prefs"
    a = root / "red_circle"
    b = root / "second"
    c = root / "broken"
    for p in (a / "chosen", a / "rejected", b / "chosen", b / "rejected", c / "chosen"):
        p.mkdir(parents=True)
    arr = {k: img(30 + i) for i, k in enumerate(["a1", "a2", "r1", "r2", "b1", "b2", "b3", "c1"])}
    Image.fromarray(arr["a1"]).save(a / "chosen" / "x.png")
    Image.fromarray(arr["a2"]).save(a / "chosen" / "y.png")
    Image.fromarray(arr["r1"]).save(a / "rejected" / "y.png")
    Image.fromarray(arr["r2"]).save(a / "rejected" / "x.png")
    (b / "prompt.txt").write_text("a blue square\n")
    Image.fromarray(arr["b1"]).save(b / "chosen" / "1.png")
    Image.fromarray(arr["b2"]).save(b / "chosen" / "2.png")
    Image.fromarray(arr["b3"]).save(b / "rejected" / "9.png")
    Image.fromarray(arr["c1"]).save(c / "chosen" / "1.png")
    ds = load_preference_pairs(root)
    assert ds.stats["skipped_missing_media"] == 1 and "rejected" in ds.skipped[0]
    assert ds.prompts == ["red circle", "red circle", "a blue square", "a blue square"]  # subfolders by name
    assert set(ds.labels) == {1.0}
    by_meta = {(ds[i].prompt, ds[i].meta["chosen"], ds[i].meta["rejected"]): ds[i] for i in range(len(ds))}
    np.testing.assert_array_equal(
        by_meta[("red circle", "x.png", "x.png")].media_b, arr["r2"]
    )  # matched by name
    np.testing.assert_array_equal(by_meta[("red circle", "y.png", "y.png")].media_a, arr["a2"])
    np.testing.assert_array_equal(by_meta[("a blue square", "2.png", "9.png")].media_a, arr["b2"])


# ------------------------------------------------------------------------------------------- prompts
def test_prompt_files_txt_and_jsonl(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# a comment\nred circle\n\n  blue square  \n   # indented comment\n")
    assert load_prompts(txt) == ["red circle", "blue square"]
    jl = tmp_path / "p.jsonl"
    jl.write_text(
        json.dumps({"prompt": "a", "seed": 1}) + "\n\n" + json.dumps({"prompt": "b", "tags": ["x"]}) + "\n"
    )
    recs = load_prompts(jl, with_metadata=True)
    assert [r.prompt for r in recs] == ["a", "b"] and recs[0].metadata == {"seed": 1}
    assert recs[1].source == f"{jl}:3"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": " "})
    )
    with pytest.raises(DataError, match=r"bad\.jsonl: line 3, column 'prompt': empty prompt"):
        load_prompts(bad)
    bad.write_text("{oops\n")
    with pytest.raises(DataError, match=r"line 1: invalid JSON"):
        load_prompts(bad)
    (tmp_path / "empty.txt").write_text("# only comments\n")
    with pytest.raises(DataError, match="no prompts"):
        load_prompts(tmp_path / "empty.txt")


# ------------------------------------------------------------------------------------------- media helpers
def test_resize_center_crop_and_pixel_range():
    wide = np.zeros((8, 16, 3), np.uint8)
    wide[:, :4] = 10
    wide[:, 4:12] = 200
    wide[:, 12:] = 30
    out = resize_center_crop(wide, 8)
    assert out.shape == (8, 8, 3) and (out == 200).all()  # the centre, nothing resampled
    px = to_pixels(np.full((4, 4, 3), 255, np.uint8))
    assert px.shape == (3, 4, 4) and torch.all(px == 1.0)
    assert torch.all(to_pixels(np.zeros((2, 4, 4, 3), np.uint8)) == -1.0)
    assert to_pixels(np.zeros((2, 4, 6, 3), np.uint8)).shape == (3, 2, 4, 6)
    assert resize_center_crop(img(0, 16, 16), 8).shape == (8, 8, 3)


# ------------------------------------------------------------------------------------------- cache
def pairs_dataset(tmp_path, n=5, size=8, name="pp.parquet"):
    images = [img(100 + i, size, size) for i in range(2 * n)]
    prompts = ["shared", "shared", "other", "third", "other"][:n]
    labels = [1, 0, 0.5, 1, 0][:n]
    path = write_parquet(tmp_path / name, pickapic_columns(images, labels, captions=prompts))
    return load_preference_pairs(path, tie_policy="half"), images


def test_cache_round_trip_values_and_manifest(tmp_path):
    ds, images = pairs_dataset(tmp_path, size=16)
    fake = FakeAdapter()
    out = build_cache(
        fake,
        ds,
        tmp_path / "cache",
        resolution=8,
        batch_size=2,
        dtype="float32",
        shard_size=2,
        progress=False,
    )
    m = read_manifest(out)
    assert (
        m["kind"] == "pairs" and m["num_items"] == 5 and m["resolution"] == [8, 8] and m["dtype"] == "float32"
    )
    assert m["model"]["name_or_path"] == "fake/model" and m["model"]["family"] == "fake"
    assert len(m["model"]["fingerprint"]) == 16 and m["latent_shape"] == [3, 4, 4]
    assert m["genalign_version"] and m["created"][:2] == "20" and m["media"] == "image"
    assert [s["num_items"] for s in m["shards"]] == [2, 2, 1]
    assert all((out / s["file"]).is_file() for s in m["shards"])
    assert m["text_keys"] == {"prompt_embeds": [4, 6], "pooled_prompt_embeds": [5]}
    assert all(shape == (2, 3, 8, 8) or shape == (1, 3, 8, 8) for shape in fake.seen_shapes)
    cached = load_cache(out, adapter=FakeAdapter(), resolution=8, dtype="float32")
    assert isinstance(cached, CachedPreferenceDataset) and len(cached) == 5
    for i in range(5):
        item = cached[i]
        want_a = fake.encode_pixels(to_pixels(images[2 * i], 8)[None])[0]
        want_b = fake.encode_pixels(to_pixels(images[2 * i + 1], 8)[None])[0]
        torch.testing.assert_close(item["latents_a"], want_a, rtol=0, atol=0)
        torch.testing.assert_close(item["latents_b"], want_b, rtol=0, atol=0)
        assert float(item["label"]) == ds.labels[i] and item["prompt"] == ds.prompts[i]
        cond = fake.encode_prompt([ds.prompts[i]])
        for key in cond:
            torch.testing.assert_close(item["cond"][key], cond[key][0], rtol=0, atol=0)
    assert cached.prompts == ds.prompts
    # "shared" twice in the first shard: its embedding is stored once there
    assert m["shards"][0]["num_prompts"] == 1
    batch = next(iter(torch.utils.data.DataLoader(cached, batch_size=3)))
    assert batch["latents_a"].shape == (3, 3, 4, 4) and batch["cond"]["prompt_embeds"].shape == (3, 4, 6)


def test_cache_refuses_other_model_resolution_or_dtype(tmp_path):
    ds, _ = pairs_dataset(tmp_path, n=2)
    out = build_cache(
        FakeAdapter(), ds, tmp_path / "c", resolution=8, batch_size=2, dtype="bf16", progress=False
    )
    assert load_cache(
        out, adapter=FakeAdapter(name="/moved/elsewhere"), resolution=(8, 8), dtype=torch.bfloat16
    )
    with pytest.raises(CacheMismatchError) as e:
        load_cache(out, adapter=FakeAdapter(vae_config={"scaling_factor": 0.5}))
    assert e.value.field == "model" and str(out) in str(e.value) and "VAE config" in str(e.value)
    with pytest.raises(CacheMismatchError) as e:
        load_cache(out, resolution=16)
    assert e.value.field == "resolution" and e.value.cached == (8, 8) and str(out) in str(e.value)
    with pytest.raises(CacheMismatchError) as e:
        load_cache(out, dtype="float32")
    assert e.value.field == "dtype" and "bfloat16" in str(e.value)
    item = load_cache(out)[0]
    assert item["latents_a"].dtype == torch.bfloat16 and item["cond"]["prompt_embeds"].dtype == torch.bfloat16


def test_cache_compares_vae_weights_with_a_precision_tolerance(tmp_path):
    ds, _ = pairs_dataset(tmp_path, n=1)
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    out = build_cache(FakeAdapter(vae_weight=w), ds, tmp_path / "c", resolution=8, progress=False)
    assert len(read_manifest(out)["model"]["weights_sample"]) == 20  # 16 weights + 4 biases
    assert load_cache(out, adapter=FakeAdapter(vae_weight=w.to(torch.bfloat16).float()))  # same weights, bf16
    with pytest.raises(CacheMismatchError, match="differs in: VAE / text encoder weights") as e:
        load_cache(out, adapter=FakeAdapter(vae_weight=w * 1.1))
    assert e.value.field == "model"


def test_cache_write_is_atomic_and_refuses_overwrite(tmp_path):
    ds, _ = pairs_dataset(tmp_path, n=5)
    work = tmp_path / "out"
    work.mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        build_cache(
            FakeAdapter(fail_on_call=3),
            ds,
            work / "cache",
            resolution=8,
            batch_size=1,
            shard_size=1,
            progress=False,
        )
    assert os.listdir(work) == []  # no cache, no temporary folder
    out = build_cache(FakeAdapter(), ds, work / "cache", resolution=8, batch_size=2, progress=False)
    with pytest.raises(DataError, match="refusing to overwrite"):
        build_cache(FakeAdapter(), ds, out, resolution=8, progress=False)
    with pytest.raises(RuntimeError):
        build_cache(
            FakeAdapter(fail_on_call=2), ds, out, resolution=4, batch_size=1, overwrite=True, progress=False
        )
    assert read_manifest(out)["resolution"] == [8, 8] and sorted(os.listdir(work)) == ["cache"]
    build_cache(FakeAdapter(), ds, out, resolution=4, overwrite=True, progress=False)
    assert read_manifest(out)["resolution"] == [4, 4] and sorted(os.listdir(work)) == ["cache"]


def test_cache_skips_media_that_fail_to_decode_after_loading(tmp_path):
    images = [img(i) for i in range(4)]
    for i, a in enumerate(images):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    path = tmp_path / "p.jsonl"
    path.write_text(
        "\n".join(
            json.dumps({"prompt": f"p{i}", "chosen": f"{2 * i}.png", "rejected": f"{2 * i + 1}.png"})
            for i in range(2)
        )
    )
    ds = load_preference_pairs(path)
    (tmp_path / "3.png").write_bytes(b"")  # broken after the load-time check
    with pytest.raises(DataError, match=r"row 1, line 2, column 'rejected'"):
        ds[1]
    out = build_cache(FakeAdapter(), ds, tmp_path / "c", resolution=8, progress=False)
    m = read_manifest(out)
    assert m["num_items"] == 1 and m["skipped"] == 1 and "row 1" in m["skipped_messages"][0]
    with pytest.raises(DataError):
        build_cache(FakeAdapter(), ds, tmp_path / "c2", resolution=8, on_error="raise", progress=False)
    assert not (tmp_path / "c2").exists()


def test_video_cache_shapes_and_frame_sampling(video_dir, tmp_path):
    d, vids = video_dir
    path = write_csv(
        tmp_path / "va.csv",
        [
            va_row(str(d / "v/a.mp4"), str(d / "v/b.mp4"), "p0", "A", "A", "B"),
            va_row(str(d / "v/c.gif"), str(d / "v/frames"), "p1", "B", "B", "B"),
        ],
    )
    ds = load_preference_pairs(path)
    fake = FakeAdapter()
    # 8 and 5 frames in one cache: the 5-frame pair is skipped unless num_frames is fixed
    out = build_cache(fake, ds, tmp_path / "c1", resolution=16, batch_size=2, progress=False)
    m = read_manifest(out)
    assert (
        m["num_items"] == 1 and m["skipped"] == 1 and m["num_frames"] == 8 and m["dims"] == ["VQ", "MQ", "TA"]
    )
    assert fake.seen_shapes[0] == (1, 3, 8, 16, 16)
    out = build_cache(
        FakeAdapter(), ds, tmp_path / "c2", resolution=16, batch_size=2, num_frames=4, progress=False
    )
    cached = load_cache(out, num_frames=4, resolution=16)
    item = cached[1]
    assert item["latents_a"].shape == (3, 4, 8, 8)
    want = fake.encode_pixels(to_pixels(vids["c.gif"][[0, 2, 5, 7]], 16)[None])[0]
    torch.testing.assert_close(item["latents_a"], want, rtol=0, atol=0)
    assert float(item["label"]) == 0.0 and item["dim_labels"].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(CacheMismatchError, match="num_frames"):
        load_cache(out, num_frames=8)


def test_cache_main_loads_the_adapter_and_reads_pairs_or_prompts(tmp_path, monkeypatch):
    from genalign import models

    calls = []

    def fake_load_adapter(path_or_id, **kw):
        calls.append((path_or_id, kw))
        return FakeAdapter(name=path_or_id)

    monkeypatch.setattr(models, "load_adapter", fake_load_adapter, raising=False)
    for i in range(2):
        Image.fromarray(img(i)).save(tmp_path / f"{i}.png")
    (tmp_path / "pairs.jsonl").write_text(
        json.dumps({"prompt": "x", "chosen": "0.png", "rejected": "1.png"}) + "\n"
    )
    out = cache_main(
        model="some/model",
        data=str(tmp_path / "pairs.jsonl"),
        out=str(tmp_path / "c"),
        resolution="8",
        batch_size=1,
        dtype="fp16",
        device="cpu",
        progress=False,
    )
    m = read_manifest(out)
    assert calls[0] == ("some/model", {"device": "cpu"})
    assert (m["kind"], m["dtype"], m["num_items"], m["model"]["name_or_path"]) == (
        "pairs",
        "float16",
        1,
        "some/model",
    )
    (tmp_path / "prompts.txt").write_text("a\nb\n# c\n")
    args = SimpleNamespace(
        model="m",
        data=str(tmp_path / "prompts.txt"),
        out=str(tmp_path / "cp"),
        resolution=8,
        batch_size=None,
        dtype=None,
        command="cache",
        progress=False,
    )
    m = read_manifest(cache_main(args))
    assert (m["kind"], m["num_items"], m["dtype"]) == ("prompts", 2, "float32")
    assert load_cache(tmp_path / "cp")[1]["prompt"] == "b"


def test_media_items_cache_rewards(tmp_path):
    items = [MediaItem("a", img(1), 0.25), MediaItem("b", img(2), None)]
    out = build_cache(FakeAdapter(), items, tmp_path / "c", resolution=8, progress=False)
    cached = load_cache(out)
    assert read_manifest(out)["kind"] == "items"
    assert float(cached[0]["reward"]) == 0.25 and torch.isnan(cached[1]["reward"])
    assert cached[0]["latents"].shape == (3, 4, 4)


def test_import_is_light():
    code = (
        "import sys, genalign.data; heavy = [m for m in ('pyarrow', 'datasets', 'imageio', 'safetensors', "
        "'diffusers', 'transformers') if m in sys.modules]; print(heavy); sys.exit(bool(heavy))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_both_video_decoders_give_the_same_frames(tmp_path, monkeypatch):
    """PyAV (in-process, the default when installed) and imageio's ffmpeg process decode every container the same,
    lossless RGB and the usual 4:2:0 encodings alike; with either, a file that is not a video is skipped and named."""
    import imageio.v2 as iio

    from genalign.data import media
    from genalign.data.media import decode_video_file, read_video, video_decoder

    assert video_decoder() == "pyav"  # the `video` and `dev` extras install it
    clips = {"rgb.mp4": write_mp4(tmp_path / "rgb.mp4", vid(3))}
    smooth = np.broadcast_to(np.linspace(0, 255, 48, dtype=np.uint8)[None, None, :, None], (5, 32, 48, 3)).copy()
    smooth[:, :16] = vid(4, frames=5, size=48)[:, :16]
    for name, codec in [("yuv.mp4", "libx264"), ("vp9.webm", "libvpx-vp9"), ("mpeg4.avi", "mpeg4")]:
        iio.mimwrite(tmp_path / name, smooth, fps=8, codec=codec, macro_block_size=1)
        clips[name] = tmp_path / name
    large = np.repeat(np.repeat(smooth[:3], 9, axis=1), 7, axis=2)  # 288 x 336: past SMALL_FRAME_AREA, threaded
    assert large.shape[1] * large.shape[2] > media.SMALL_FRAME_AREA
    iio.mimwrite(tmp_path / "large.mp4", large, fps=8, codec="libx264", macro_block_size=1)
    clips["large.mp4"] = tmp_path / "large.mp4"
    for name, path in clips.items():
        by_pyav, by_imageio = read_video(path), decode_video_file(path, "imageio")
        assert by_pyav.dtype == np.uint8 and by_pyav.shape == by_imageio.shape, name
        assert np.array_equal(by_pyav, by_imageio), name
    assert np.array_equal(read_video(clips["rgb.mp4"]), vid(3))  # lossless: the written frames exactly
    lossy_ramp = read_video(clips["yuv.mp4"])[:, 24:].astype(int)  # rows away from the noise
    assert np.abs(lossy_ramp - smooth[:, 24:]).mean() < 4  # lossy, but the same picture where it is smooth
    (tmp_path / "junk.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 8)
    csv_path = write_csv(tmp_path / "pairs.csv", [va_row("rgb.mp4", "yuv.mp4", "good", "A", "A", "A"),
                                                   va_row("junk.mp4", "rgb.mp4", "junk", "A", "A", "A")])
    for decoder in ("pyav", "imageio"):
        monkeypatch.setattr(media, "video_decoder", lambda decoder=decoder: decoder)
        ds = load_preference_pairs(csv_path, verify="decode")
        assert ds.prompts == ["good"] and ds.stats["skipped_corrupt_media"] == 1, decoder
        assert "row 1, line 3, column 'path_A'" in ds.skipped[0] and "junk.mp4" in ds.skipped[0], decoder
    with pytest.raises(ValueError, match="unknown video decoder 'cv2'"):
        decode_video_file(clips["rgb.mp4"], "cv2")
