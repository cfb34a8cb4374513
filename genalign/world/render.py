"""Deterministic renderer of the world's language: prompt -> clean image (32x32 RGB) or video (8 frames).

Shapes are drawn from signed distance functions with a one-pixel anti-aliased edge, at a random position,
size and background grey (all drawn from the given seed). Every shape fills the square box
[cx - r, cx + r] x [cy - r, cy + r] exactly, so the oracle can fit a shape template to an object's bounding box.
Corruptions used by the pretraining corpus and the oracle's validation live here too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..media import unit_to_uint8
from .grammar import COLORS, SHAPES, PromptSpec, parse_prompt

IMAGE_SIZE = 32
NUM_FRAMES = 8
CROSS_ARM = 0.38  # half-width of a cross's arms, relative to its half-size


@dataclass(frozen=True)
class Placed:
    color: str
    shape: str
    cx: float
    cy: float
    r: float


def shape_sdf(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (pixels, negative inside) of a shape of half-size r centred at the origin; y points down."""
    if shape == "circle":
        return np.sqrt(dx**2 + dy**2) - r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - r
    if shape == "triangle":  # apex up, base at the bottom of the box
        s5 = np.sqrt(5.0)
        return np.maximum(np.maximum(dy - r, (-2 * dx - dy - r) / s5), (2 * dx - dy - r) / s5)
    if shape == "cross":
        a = CROSS_ARM * r
        return np.minimum(
            np.maximum(np.abs(dx) - r, np.abs(dy) - a), np.maximum(np.abs(dx) - a, np.abs(dy) - r)
        )
    raise ValueError(f"unknown shape {shape!r}")


def coverage(shape: str, cx: float, cy: float, r: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Fraction of each pixel covered by the shape (a one-pixel linear edge), shape (size, size)."""
    centers = np.arange(size) + 0.5
    dx = centers[None, :] - cx
    dy = centers[:, None] - cy
    return np.clip(0.5 - shape_sdf(shape, dx, dy, r), 0.0, 1.0)


def background(rng: np.random.Generator) -> np.ndarray:
    grey = rng.uniform(0.10, 0.26)
    return np.clip(grey + rng.uniform(-0.03, 0.03, size=3), 0, 1)


def compose(objects: list[Placed], bg: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    img = np.broadcast_to(bg, (size, size, 3)).copy()
    for o in objects:
        cov = coverage(o.shape, o.cx, o.cy, o.r, size)[..., None]
        img = img * (1 - cov) + np.asarray(COLORS[o.color]) * cov
    return img.astype(np.float32)


def _apart(a: tuple[float, float, float], b: tuple[float, float, float], gap: float = 3.0) -> bool:
    # Chebyshev distance: the two bounding boxes are separated by at least `gap` pixels.
    return max(abs(a[0] - b[0]), abs(a[1] - b[1])) >= a[2] + b[2] + gap


def layout(spec: PromptSpec, rng: np.random.Generator, size: int = IMAGE_SIZE) -> list[Placed]:
    """Random positions and sizes satisfying the prompt (relation, count), boxes never touching."""
    n = len(spec.objects)
    r_range = {1: (6.0, 9.0), 2: (4.8, 6.5), 3: (4.5, 5.5)}[n]
    for _ in range(1000):
        boxes = []
        for _ in range(n):
            r = rng.uniform(*r_range)
            boxes.append((rng.uniform(r + 1, size - r - 1), rng.uniform(r + 1, size - r - 1), r))
        if any(not _apart(boxes[i], boxes[j]) for i in range(n) for j in range(i + 1, n)):
            continue
        if spec.relation == "left of":
            (ax, ay, _), (bx, by, _) = boxes
            if not (bx - ax >= 6 and bx - ax > abs(by - ay) + 3):
                continue
        if spec.relation == "above":
            (ax, ay, _), (bx, by, _) = boxes
            if not (by - ay >= 6 and by - ay > abs(bx - ax) + 3):
                continue
        return [Placed(o.color, o.shape, x, y, r) for o, (x, y, r) in zip(spec.objects, boxes)]
    raise RuntimeError(f"could not place {spec}")  # pragma: no cover - the ranges above always fit


def render_image(prompt: str | PromptSpec, seed: int | np.random.Generator) -> np.ndarray:
    """Clean image for an image prompt: float32 (H, W, 3) in [0, 1]."""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    rng = np.random.default_rng(seed)
    bg = background(rng)
    return compose(layout(spec, rng), bg)


COMPOSITION_FLAWS = ("missing", "extra", "merged")


def render_flawed_image(prompt: str | PromptSpec, seed: int | np.random.Generator, flaw: str) -> np.ndarray:
    """A render that fails the prompt's composition the way the generators do: one object `missing`, an `extra`
    object (a random colour and shape, apart from the others) or the first two objects `merged` into one blob
    (the second drawn overlapping the first). It draws the background and the layout exactly as `render_image`
    does with the same seed (or a copy of the same generator), so the two differ in the flaw only. A prompt with
    one object cannot be `merged`; where no room is left for an `extra` object, one goes `missing` instead."""
    if flaw not in COMPOSITION_FLAWS:
        raise ValueError(f"unknown flaw {flaw!r} (known: {COMPOSITION_FLAWS})")
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    rng = np.random.default_rng(seed)
    bg = background(rng)
    objects = layout(spec, rng)
    if flaw == "merged":
        if len(objects) < 2:
            raise ValueError(f"{prompt!r} has one object: nothing to merge")
        a, b = objects[0], objects[1]
        angle, reach = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.7) * (a.r + b.r)  # overlapping boxes
        lo, hi = b.r + 1, IMAGE_SIZE - b.r - 1
        objects[1] = Placed(b.color, b.shape, float(np.clip(a.cx + reach * np.cos(angle), lo, hi)),
                            float(np.clip(a.cy + reach * np.sin(angle), lo, hi)), b.r)
        return compose(objects, bg)
    if flaw == "extra":
        for _ in range(200):
            r = rng.uniform(4.5, 6.0)
            box = (rng.uniform(r + 1, IMAGE_SIZE - r - 1), rng.uniform(r + 1, IMAGE_SIZE - r - 1), r)
            if all(_apart(box, (o.cx, o.cy, o.r)) for o in objects):
                color, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
                return compose([*objects, Placed(color, shape, *box)], bg)
    objects.pop(int(rng.integers(len(objects))))  # missing (or no room for an extra one)
    return compose(objects, bg)


DIRECTION_VECTORS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}


def video_track(direction: str, rng: np.random.Generator, frames: int = NUM_FRAMES, size: int = IMAGE_SIZE):
    """Object half-size and per-frame centres for a straight, constant-speed motion staying in frame."""
    r = rng.uniform(4.5, 6.0)
    ux, uy = DIRECTION_VECTORS[direction]
    speed = rng.uniform(1.8, 2.2) if direction != "still" else 0.0
    travel = speed * (frames - 1)
    lo, hi = r + 1, size - r - 1
    x0 = rng.uniform(lo - min(0, ux) * travel, hi - max(0, ux) * travel)
    y0 = rng.uniform(lo - min(0, uy) * travel, hi - max(0, uy) * travel)
    steps = np.arange(frames)
    return r, x0 + ux * speed * steps, y0 + uy * speed * steps


def _prompt_object_track(prompt: str | PromptSpec, rng: np.random.Generator, frames: int):
    """A video prompt's background and its object placed in each frame (the draws every video render starts with)."""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    if not spec.is_video:
        raise ValueError(f"{prompt!r} is not a video prompt (expected e.g. 'red circle moving left')")
    bg = background(rng)
    obj = spec.objects[0]
    r, xs, ys = video_track(spec.direction, rng, frames)
    return bg, [Placed(obj.color, obj.shape, x, y, r) for x, y in zip(xs, ys)]


def render_video(prompt: str | PromptSpec, seed: int | np.random.Generator, frames: int = NUM_FRAMES) -> np.ndarray:
    """Clean video for a video prompt: float32 (F, H, W, 3) in [0, 1]."""
    bg, placed = _prompt_object_track(prompt, np.random.default_rng(seed), frames)
    return np.stack([compose([p], bg) for p in placed])


def render_cluttered_video(prompt: str | PromptSpec, seed: int | np.random.Generator, frames: int = NUM_FRAMES,
                           distractors: int = 2, dropped_frames: int = 2) -> np.ndarray:
    """A video prompt's clip with the flaws of the world's video generator around it: `distractors` smaller objects
    of other colours and shapes, each on its own track and shown in a random half or more of the frames, and the
    prompt's object missing from `dropped_frames` random frames. The prompt's object stays the largest one, so
    its caption is still the prompt. Float32 (F, H, W, 3) in [0, 1]."""
    rng = np.random.default_rng(seed)
    bg, placed = _prompt_object_track(prompt, rng, frames)
    main = [[p] for p in placed]
    for f in rng.choice(frames, size=min(dropped_frames, frames - 2), replace=False):
        main[f] = []
    layers = [[] for _ in range(frames)]
    for _ in range(distractors):
        color = str(rng.choice([c for c in COLORS if c != placed[0].color]))
        shape = str(rng.choice(SHAPES))
        _, dx, dy = video_track(str(rng.choice(list(DIRECTION_VECTORS))), rng, frames)
        size = rng.uniform(0.45, 0.7) * placed[0].r
        for f in np.flatnonzero(rng.random(frames) < rng.uniform(0.5, 1.0)):
            layers[f].append(Placed(color, shape, dx[f], dy[f], size))
    return np.stack([compose(layers[f] + main[f], bg) for f in range(frames)])


# ---------------------------------------------------------------- corruptions (corpus flaws, oracle tests)
IMAGE_CORRUPTIONS = ("blur", "noise", "artifacts", "malformed")


def corrupt_image(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Degrade an image (H, W, 3) the way the corpus's flawed samples are degraded."""
    out = img.copy()
    if kind == "blur":
        out = ndimage.gaussian_filter(out, sigma=(rng.uniform(0.9, 1.6),) * 2 + (0,))
    elif kind == "noise":
        out = out + rng.normal(0, rng.uniform(0.07, 0.13), size=out.shape)
    elif kind == "artifacts":
        h, w, _ = out.shape
        for _ in range(rng.integers(3, 6)):
            y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
            out[y : y + 2, x : x + 2] = rng.uniform(0, 1, size=3)
    elif kind == "malformed":
        # Smear the object sideways in a wave: edges become ragged, the silhouette no longer a clean shape.
        h = out.shape[0]
        shift = np.round(rng.uniform(2.0, 3.0) * np.sin(np.arange(h) * rng.uniform(0.9, 1.4))).astype(int)
        out = np.stack([np.roll(row, s, axis=0) for row, s in zip(out, shift)])
    else:
        raise ValueError(f"unknown corruption {kind!r} (known: {IMAGE_CORRUPTIONS})")
    return np.clip(out, 0, 1).astype(np.float32)


def jitter_video(prompt: str, seed: int, amount: float = 2.0, frames: int = NUM_FRAMES) -> np.ndarray:
    """A video whose object shakes around its trajectory: the motion flaw of the corpus."""
    spec = parse_prompt(prompt)
    rng = np.random.default_rng(seed)
    bg = background(rng)
    obj = spec.objects[0]
    r, xs, ys = video_track(spec.direction, rng, frames)
    jx, jy = rng.normal(0, amount, size=(2, frames))
    lo, hi = r + 0.5, IMAGE_SIZE - r - 0.5
    return np.stack(
        [
            compose([Placed(obj.color, obj.shape, float(np.clip(x, lo, hi)), float(np.clip(y, lo, hi)), r)], bg)
            for x, y in zip(xs + jx, ys + jy)
        ]
    )


def flicker_video(video: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-frame brightness and noise flicker: a visual-quality flaw of video frames."""
    gains = rng.uniform(0.75, 1.25, size=(video.shape[0], 1, 1, 1))
    noisy = video * gains + rng.normal(0, 0.05, size=video.shape)
    return np.clip(noisy, 0, 1).astype(np.float32)


to_uint8 = unit_to_uint8  # the renderer's name for it
