"""The imperfect pretraining corpus of the world's base generators.

Real base models are trained on scraped data with wrong captions and degraded media; so is the world's. The
shares are configurable; the flags of every sample are kept so tests can check them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from .grammar import COLORS, COUNTS, DIRECTIONS, PLURALS, SHAPES, image_splits, parse_prompt, video_splits
from .render import (
    IMAGE_CORRUPTIONS,
    corrupt_image,
    flicker_video,
    jitter_video,
    render_image,
    render_video,
    to_uint8,
)


@dataclass
class CorpusShares:
    wrong_caption: float = 0.25
    degraded: float = 0.20
    bad_motion: float = 0.20  # videos: jittery motion


@dataclass
class Corpus:
    media: np.ndarray  # uint8, (N, H, W, 3) or (N, F, H, W, 3)
    captions: list[str]
    true_prompts: list[str]
    wrong_caption: np.ndarray  # bool (N,)
    degraded: np.ndarray  # bool (N,)


def _other(options, current, rng: random.Random):
    return rng.choice([o for o in options if o != current])


def miscaption(prompt: str, rng: random.Random) -> str:
    """A caption that gets one thing wrong: a colour, a shape, the count, the relation's order or the direction."""
    spec = parse_prompt(prompt)
    words = prompt.split()
    if spec.template == "video":
        which = rng.choice(["color", "shape", "direction"])
        if which == "color":
            words[0] = _other(COLORS, words[0], rng)
        elif which == "shape":
            words[1] = _other(SHAPES, words[1], rng)
        else:
            words[3] = _other(DIRECTIONS, words[3], rng)
        return " ".join(words)
    if spec.template == "count":
        which = rng.choice(["count", "color", "shape"])
        if which == "count":
            words[0] = _other(COUNTS, words[0], rng)
        elif which == "color":
            words[1] = _other(COLORS, words[1], rng)
        else:
            words[2] = PLURALS[_other(SHAPES, spec.objects[0].shape, rng)]
        return " ".join(words)
    if spec.template == "relation":
        a, b = spec.objects
        rel = spec.relation
        which = rng.choice(["swap", "color", "shape"])
        if which == "swap":
            a, b = b, a
        elif which == "color":
            a = type(a)(_other([c for c in COLORS if c != b.color], a.color, rng), a.shape)
        else:
            a = type(a)(a.color, _other(SHAPES, a.shape, rng))
        return f"{a.color} {a.shape} {rel} {b.color} {b.shape}"
    which = rng.choice(["color", "shape"])
    if which == "color":
        words[0] = _other(COLORS, words[0], rng)
    else:
        words[1] = _other(SHAPES, words[1], rng)
    return " ".join(words)


def _collect(n: int, media_shape: tuple[int, ...], draw, shares: CorpusShares, rng: random.Random) -> Corpus:
    """n samples from `draw(i) -> (true prompt, float media, degraded?)`, each captioned wrongly with probability
    shares.wrong_caption. The random draws happen in a fixed order, so a seed always gives the same corpus."""
    media = np.empty((n, *media_shape), np.uint8)
    captions, trues = [], []
    wrong, degraded = np.zeros(n, bool), np.zeros(n, bool)
    for i in range(n):
        prompt, sample, degraded[i] = draw(i)
        caption = prompt
        if rng.random() < shares.wrong_caption:
            caption = miscaption(prompt, rng)
            wrong[i] = True
        media[i] = to_uint8(sample)
        captions.append(caption)
        trues.append(prompt)
    return Corpus(media, captions, trues, wrong, degraded)


def make_image_corpus(n: int, seed: int = 0, shares: CorpusShares | None = None) -> Corpus:
    shares = shares or CorpusShares()
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    by_template: dict[str, list[str]] = {}
    for p in image_splits().train:
        by_template.setdefault(parse_prompt(p).template, []).append(p)
    # Relation prompts are 90% of the language but need not be 90% of the data.
    mix = {"single": 0.35, "count": 0.25, "relation": 0.40}

    def draw(i):
        template = rng.choices(list(mix), weights=list(mix.values()))[0]
        prompt = rng.choice(by_template[template])
        img = render_image(prompt, nrng)
        if rng.random() < shares.degraded:
            return prompt, corrupt_image(img, rng.choice(IMAGE_CORRUPTIONS), nrng), True
        return prompt, img, False

    return _collect(n, (32, 32, 3), draw, shares, rng)


def make_video_corpus(n: int, seed: int = 0, shares: CorpusShares | None = None, frames: int = 8) -> Corpus:
    shares = shares or CorpusShares()
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    train = video_splits().train

    def draw(i):
        prompt = rng.choice(train)
        bad = False
        if rng.random() < shares.bad_motion and not prompt.endswith("still"):
            vid, bad = jitter_video(prompt, int(nrng.integers(1 << 31)), frames=frames), True
        else:
            vid = render_video(prompt, nrng, frames=frames)
        if rng.random() < shares.degraded:
            vid, bad = flicker_video(vid, nrng), True
        return prompt, vid, bad

    return _collect(n, (frames, 32, 32, 3), draw, shares, rng)
