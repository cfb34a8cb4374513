"""The world's prompt language: a tiny compositional grammar with fixed train / held-out splits.

Image prompts come in three templates, so that text alignment is not trivial (GenEval-style):

    single    "red circle"
    relation  "red circle left of blue square"   /   "red circle above blue square"
    count     "two red circles"                  /   "three red circles"

Video prompts: "red circle moving left" (directions: left, right, up, down, still).

`parse_prompt` turns a prompt back into a `PromptSpec`, which the renderer draws and the oracle checks.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.10, 0.78, 0.15),
    "blue": (0.15, 0.30, 0.98),
    "yellow": (0.97, 0.88, 0.10),
    "magenta": (0.90, 0.15, 0.88),
    "cyan": (0.10, 0.88, 0.92),
}
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
SINGULAR = {v: k for k, v in PLURALS.items()}
RELATIONS = ("left of", "above")
COUNTS = {"two": 2, "three": 3}
DIRECTIONS = ("left", "right", "up", "down", "still")

# Every word the language uses; the world's word-level tokenizer is built from this list.
VOCABULARY = sorted(
    set(COLORS)
    | set(SHAPES)
    | set(PLURALS.values())
    | {"left", "of", "above", "moving"}
    | set(COUNTS)
    | set(DIRECTIONS)
)


@dataclass(frozen=True)
class ObjectSpec:
    color: str
    shape: str


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for. `relation` relates objects[0] to objects[1]."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None
    direction: str | None = None  # videos only
    template: str = "single"

    @property
    def is_video(self) -> bool:
        return self.direction is not None


class PromptError(ValueError):
    pass


def parse_prompt(prompt: str) -> PromptSpec:
    """Parse a prompt of the world's language; raises PromptError naming the prompt otherwise."""
    words = prompt.strip().lower().split()
    if not words:
        raise PromptError("empty prompt: the world's prompts look like 'red circle' or 'two blue squares'")

    def obj(color: str, shape: str) -> ObjectSpec:
        if color not in COLORS:
            raise PromptError(f"prompt {prompt!r}: unknown colour {color!r} (known: {', '.join(COLORS)})")
        if shape not in SHAPES:
            raise PromptError(f"prompt {prompt!r}: unknown shape {shape!r} (known: {', '.join(SHAPES)})")
        return ObjectSpec(color, shape)

    if len(words) == 2:
        return PromptSpec((obj(*words),), template="single")
    if len(words) == 3 and words[0] in COUNTS:
        shape = SINGULAR.get(words[2], words[2])
        return PromptSpec((obj(words[1], shape),) * COUNTS[words[0]], template="count")
    if len(words) == 4 and words[2] == "moving":
        if words[3] not in DIRECTIONS:
            raise PromptError(f"prompt {prompt!r}: unknown direction {words[3]!r} (known: {', '.join(DIRECTIONS)})")
        return PromptSpec((obj(words[0], words[1]),), direction=words[3], template="video")
    if len(words) == 6 and words[2:4] == ["left", "of"]:
        return PromptSpec((obj(*words[0:2]), obj(*words[4:6])), relation="left of", template="relation")
    if len(words) == 5 and words[2] == "above":
        return PromptSpec((obj(*words[0:2]), obj(*words[3:5])), relation="above", template="relation")
    raise PromptError(
        f"prompt {prompt!r} is not in the world's language; examples: 'red circle', "
        "'red circle left of blue square', 'green triangle above cyan cross', 'two yellow squares', "
        "'magenta cross moving left'"
    )


def all_image_prompts() -> dict[str, list[str]]:
    single = [f"{c} {s}" for c in COLORS for s in SHAPES]
    count = [f"{n} {c} {PLURALS[s]}" for n in COUNTS for c in COLORS for s in SHAPES]
    relation = [
        f"{a} {rel} {b}"
        for rel in RELATIONS
        for a in single
        for b in single
        if a != b and a.split()[0] != b.split()[0]  # distinct colours, so the oracle can tell who is who
    ]
    return {"single": single, "count": count, "relation": relation}


def all_video_prompts() -> list[str]:
    return [f"{c} {s} moving {d}" for c in COLORS for s in SHAPES for d in DIRECTIONS]


@dataclass(frozen=True)
class Splits:
    train: list[str] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)


_SPLIT_SEED = 20261126
HELDOUT_SHARE = 0.2


def _split(prompts: list[str], seed: int) -> Splits:
    order = sorted(prompts)
    random.Random(seed).shuffle(order)
    n_held = max(1, round(HELDOUT_SHARE * len(order)))
    return Splits(train=sorted(order[n_held:]), heldout=sorted(order[:n_held]))


def image_splits() -> Splits:
    """Fixed split, per template, so every template appears in both halves."""
    train, held = [], []
    for i, (_, prompts) in enumerate(sorted(all_image_prompts().items())):
        s = _split(prompts, _SPLIT_SEED + i)
        train += s.train
        held += s.heldout
    return Splits(train=train, heldout=held)


def video_splits() -> Splits:
    return _split(all_video_prompts(), _SPLIT_SEED + 100)


def split_prompts(kind: str, split: str) -> list[str]:
    """The `split` ("train" | "heldout") prompts of `kind` ("image" | "video")."""
    splits = image_splits() if kind == "image" else video_splits()
    return splits.train if split == "train" else splits.heldout


def pair_prompts(kind: str, split: str, n: int, seed: int, samples_per_prompt: int = 2) -> list[str]:
    """The prompts of `genalign world pairs` for n pairs: prompt i is `Random(seed + i).choice(<kind's split>)`, so a
    larger run with the same seed starts with the pairs of a smaller one. With K samples per prompt, every two of
    them a pair, n pairs take ceil(n / (K (K - 1) / 2)) prompts."""
    pool = split_prompts(kind, split)
    count = math.ceil(n / math.comb(samples_per_prompt, 2))
    return [random.Random(seed + i).choice(pool) for i in range(count)]


def heldout_eval_prompts(kind: str = "image", n: int = 64, seed: int = 0) -> list[str]:
    """A fixed, template-balanced subset of the held-out prompts used by `genalign eval`."""
    held = image_splits().heldout if kind == "image" else video_splits().heldout
    if kind == "image":
        by_template: dict[str, list[str]] = {}
        for p in held:
            by_template.setdefault(parse_prompt(p).template, []).append(p)
        rng = random.Random(seed)
        picked: list[str] = []
        # Equal thirds where possible: a base model's TA is an average over templates of different difficulty.
        share = n // len(by_template)
        for t in sorted(by_template):
            pool = sorted(by_template[t])
            rng.shuffle(pool)
            picked += pool[:share]
        rest = sorted(set(held) - set(picked))
        rng.shuffle(rest)
        return picked + rest[: n - len(picked)]
    rng = random.Random(seed)
    pool = sorted(held)
    rng.shuffle(pool)
    return pool[:n]
