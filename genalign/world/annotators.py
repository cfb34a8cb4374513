"""Simulated human annotators: preference pairs of base-model samples, labelled from the oracle.

Per dimension, an annotator compares the oracle scores of A and B: a difference below `tie_margin` is a tie;
otherwise the better one wins. With probability `noise` the annotator instead gives one of the two other
labels at random (real annotators disagree with each other about this often). Images get one overall
label (Pick-a-Pic has no per-dimension labels): the oracle's `overall` = mean of TA and VQ.
Pairs are written in the formats genalign reads for real data: Pick-a-Pic-style parquet for images
(PNG bytes in `jpg_0`/`jpg_1`), VideoAlign-style CSV with lossless MP4 files for videos.
"""

from __future__ import annotations

import io
import itertools
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..media import uint8_pixels, write_video
from .oracle import judge, judge_many

LABELS = ("A", "B", "same")


@dataclass
class Annotator:
    tie_margin: float = 0.05
    noise: float = 0.10
    seed: int = 0

    def __post_init__(self):
        self._rng = random.Random(self.seed)

    def clean_label(self, score_a: float, score_b: float) -> str:
        if abs(score_a - score_b) < self.tie_margin:
            return "same"
        return "A" if score_a > score_b else "B"

    def label(self, score_a: float, score_b: float) -> str:
        truth = self.clean_label(score_a, score_b)
        if self._rng.random() < self.noise:
            return self._rng.choice([x for x in LABELS if x != truth])
        return truth


def overall_image_score(scores: dict[str, float]) -> float:
    return 0.5 * (scores["TA"] + scores["VQ"])


def png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(uint8_pixels(img, "a labelled pair's image")).save(buf, format="PNG")
    return buf.getvalue()


def judge_pairs(a: np.ndarray, b: np.ndarray, prompts: list[str]) -> list[tuple[dict, dict]]:
    return [(judge(x, p).as_dict(), judge(y, p).as_dict()) for x, y, p in zip(a, b, prompts)]


def label_image_pairs(a: np.ndarray, b: np.ndarray, prompts: list[str], annotator: Annotator,
                      judgements: list[tuple[dict, dict]] | None = None) -> list[dict]:
    """Rows of a Pick-a-Pic-style table, plus the oracle scores (columns `oracle_*`) for analysis. `judgements`:
    the oracle's scores of each pair's two sides when known already (pairs that share samples)."""
    rows = []
    for img_a, img_b, p, (ja, jb) in zip(a, b, prompts, judgements or judge_pairs(a, b, prompts)):
        lab = annotator.label(overall_image_score(ja), overall_image_score(jb))
        label_0 = {"A": 1.0, "B": 0.0, "same": 0.5}[lab]
        rows.append({
            "caption": p, "jpg_0": png_bytes(img_a), "jpg_1": png_bytes(img_b),
            "label_0": label_0, "label_1": 1.0 - label_0,
            "oracle_label": annotator.clean_label(overall_image_score(ja), overall_image_score(jb)),
            **{f"oracle_{k}_0": v for k, v in ja.items()}, **{f"oracle_{k}_1": v for k, v in jb.items()},
        })
    return rows


IMAGE_DICTIONARY_BYTES = 1 << 30  # per column chunk; past it pyarrow falls back to plain encoding


def write_pickapic_parquet(rows: list[dict], path: str | Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    # Pairs of K samples per prompt name each picture K - 1 times: a dictionary page large enough for every
    # distinct picture stores each once (57344 pairs of 8 samples per prompt: 113 MB -> 52 MB, read 3.8 s -> 1.0 s).
    # Min / max statistics of PNG bytes would only copy two pictures into every column chunk's metadata.
    pq.write_table(table, path, dictionary_pagesize_limit=IMAGE_DICTIONARY_BYTES,
                   write_statistics=[c for c in table.column_names if c not in ("jpg_0", "jpg_1")])
    return path


def label_video_pairs(a: np.ndarray, b: np.ndarray, prompts: list[str], annotator: Annotator, out_dir: str | Path,
                      fps: int = 8, prefix: str = "pair", progress: bool = True,
                      judgements: list[tuple[dict, dict]] | None = None,
                      clip_ids: list[tuple[int, int]] | None = None) -> list[dict]:
    """Write each clip as MP4 under out_dir/videos and return VideoAlign CSV rows (paths relative to out_dir).
    `clip_ids`: each pair's two sample numbers, where one sample is in several pairs (K samples per prompt): each
    sample is then written once, as videos/{prefix}-sample{n}.mp4, and every row it is in names that file."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    rows = []
    written: set[str] = set()
    pairs = tqdm(enumerate(zip(a, b, prompts)), total=len(prompts), desc="judging and writing clips", mininterval=5,
                 disable=not progress or len(prompts) < 64)  # about 4 pairs/s: thousands take minutes
    for i, (va, vb, p) in pairs:
        ja, jb = judgements[i] if judgements else (judge(va, p).as_dict(), judge(vb, p).as_dict())
        if clip_ids is None:
            pa, pb = f"videos/{prefix}{i:05d}_A.mp4", f"videos/{prefix}{i:05d}_B.mp4"
        else:
            pa, pb = (f"videos/{prefix}-sample{n:05d}.mp4" for n in clip_ids[i])
        for path, clip in ((pa, va), (pb, vb)):
            if path not in written:
                write_video(out_dir / path, clip, fps=fps)
                written.add(path)
        row = {"path_A": pa, "path_B": pb, "prompt": p}
        for d in ("VQ", "MQ", "TA"):
            row[d] = annotator.label(ja[d], jb[d])
        row.update(fps_A=fps, num_frames_A=len(va), fps_B=fps, num_frames_B=len(vb))
        for d in ("VQ", "MQ", "TA"):
            row[f"oracle_{d}"] = annotator.clean_label(ja[d], jb[d])
        rows.append(row)
    return rows


def write_videoalign_csv(rows: list[dict], path: str | Path) -> Path:
    """Rows as a VideoAlign CSV; the columns are every row's keys in order of appearance, blank where a row has
    none (a blank label cell reads as "not labelled")."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_render_pairs(kind: str, prompts: list[str], out_dir: str | Path, annotator: Annotator, *, seed: int = 0,
                      allowed: set[str] | None = None, autoencoder: float = 0.5, progress: bool = True,
                      sdedit_adapter=None, sdedit_strength: float = 0.6, **sampling) -> Path:
    """Labelled pairs without the generator: each prompt's render (A) against the render of a one-attribute-swapped
    prompt (B: `clip_pretrain.hard_negative_prompt`, drawn from `allowed`, e.g. the train split), with the same
    seed, so the two differ in that attribute only. A share `autoencoder` of the pairs goes through the world
    autoencoder (frame by frame for videos) so they look like the generators' output. Labelled by `annotator` as
    sampled pairs are: TA goes to A, VQ / MQ are mostly ties.

    What it is for: a stage 1 that teaches text alignment to a reward model with no pretrained text-vision grounding
    (the world's tiny VideoReward), as captioned renders do for the world CLIP. Written like `make_preference_data`
    (Pick-a-Pic parquet / VideoAlign CSV under out_dir).

    `sdedit_adapter` (images): instead of the autoencoder, every render goes through that generator by SDEdit
    (noised to `sdedit_strength`, denoised on its own prompt, the same noise for both sides of a pair): pictures in
    the generator's own style, blobs and all, whose content still follows the render. The annotator labels what
    came out, so a picture the generator changed is judged as it is."""
    from .clip_pretrain import autoencoder_round_trip, hard_negative_prompt, load_world_autoencoder
    from .render import render_image, render_video, to_uint8

    if kind not in ("image", "video"):
        raise ValueError(f"kind must be 'image' or 'video', got {kind!r}")
    render = render_image if kind == "image" else render_video
    rng = random.Random(seed)
    negatives = [hard_negative_prompt(p, rng, allowed) for p in prompts]
    a = np.stack([to_uint8(render(p, seed * 1_000_003 + i)) for i, p in enumerate(prompts)])
    b = np.stack([to_uint8(render(q, seed * 1_000_003 + i)) for i, q in enumerate(negatives)])
    if sdedit_adapter is not None:
        if kind != "image":
            raise ValueError("SDEdit render pairs are for images (the video model's VAE is per frame)")
        a = sdedit_images(sdedit_adapter, a, prompts, sdedit_strength, seed, progress=progress, **sampling)
        b = sdedit_images(sdedit_adapter, b, negatives, sdedit_strength, seed, progress=progress, **sampling)
        return write_pickapic_parquet(label_image_pairs(a, b, prompts, annotator), Path(out_dir) / "pairs.parquet")
    through = np.array([rng.random() < autoencoder for _ in prompts], dtype=bool)
    if through.any():
        vae = load_world_autoencoder()
        for arr in (a, b):
            picked = arr[through]
            frames = picked.reshape(-1, *picked.shape[-3:])  # videos: every frame on its own
            arr[through] = autoencoder_round_trip(frames, vae).reshape(picked.shape)
    out_dir = Path(out_dir)
    if kind == "image":
        return write_pickapic_parquet(label_image_pairs(a, b, prompts, annotator), out_dir / "pairs.parquet")
    rows = label_video_pairs(a, b, prompts, annotator, out_dir, prefix="render", progress=progress)
    return write_videoalign_csv(rows, out_dir / "pairs.csv")


def sdedit_images(adapter, images: np.ndarray, prompts: list[str], strength: float, seed: int, batch_size: int = 64,
                  progress: bool = True, **sampling) -> np.ndarray:
    """uint8 (N, H, W, 3) -> the generator's SDEdit of each on its prompt, uint8; noise seeded per batch start, so
    the i-th image of two calls with the same seed gets the same noise."""
    from ..data.media import to_pixels
    from ..sampling import initial_noise, latents_to_uint8, sample_latents

    height, width = images.shape[1:3]
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc="sdedit", disable=not progress):
        chunk = torch.stack([to_pixels(im) for im in images[start:start + batch_size]])
        with torch.no_grad():
            init = adapter.encode_pixels(chunk.to(adapter.device))
        g = torch.Generator().manual_seed(seed * 1_000_003 + start)
        noise = initial_noise(adapter, len(chunk), height, width, None, g)
        lat = sample_latents(adapter, prompts[start:start + batch_size], latents=noise, init_latents=init,
                             strength=strength, height=height, width=width, **sampling)
        out.append(latents_to_uint8(adapter, lat))
    return np.concatenate(out)


def make_preference_data(adapter, kind: str, prompts: list[str], out_dir: str | Path, annotator: Annotator,
                         seed: int = 0, progress: bool = True, samples_per_prompt: int = 2,
                         num_pairs: int | None = None, workers: int | None = None, **sampling) -> Path:
    """Sample `samples_per_prompt` outputs per prompt from `adapter` and write labelled pairs (parquet or CSV) under
    out_dir: every two samples of a prompt make a pair, K (K - 1) / 2 per prompt (as preference datasets with
    several images per prompt are compared, e.g. ImageReward's rankings), the first `num_pairs` of them (default
    all). Two per prompt: one pair each. `workers`: processes judging the samples (`judge_many`)."""
    from ..eval.oracle_eval import generate

    if samples_per_prompt < 2:
        raise ValueError(f"samples_per_prompt must be at least 2 to make pairs, got {samples_per_prompt}")
    samples, flat = generate(adapter, prompts, samples_per_prompt, seed=seed, progress=progress, **sampling)
    pairs = [(start + i, start + j) for start in range(0, len(flat), samples_per_prompt)
             for i, j in itertools.combinations(range(samples_per_prompt), 2)][:num_pairs]
    a, b = samples[[i for i, _ in pairs]], samples[[j for _, j in pairs]]
    ps = [flat[i] for i, _ in pairs]
    used = sorted({i for pair in pairs for i in pair})
    judged = {i: j.as_dict() for i, j in zip(used, judge_many([samples[i] for i in used], [flat[i] for i in used],
                                                             workers=workers, progress=progress))}
    judgements = [(judged[i], judged[j]) for i, j in pairs]
    out_dir = Path(out_dir)
    if kind == "image":
        return write_pickapic_parquet(label_image_pairs(a, b, ps, annotator, judgements), out_dir / "pairs.parquet")
    rows = label_video_pairs(a, b, ps, annotator, out_dir, progress=progress, judgements=judgements, clip_ids=pairs)
    return write_videoalign_csv(rows, out_dir / "pairs.csv")
