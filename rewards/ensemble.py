"""An ensemble of reward models with the same dimensions, saved and loaded as one reward model folder.

    ensemble = EnsembleReward([load_reward_model("run-a/reward_model"), load_reward_model("run-b/reward_model")])
    ensemble.save_pretrained("reward-ensemble")      # member-0/, member-1/ and genalign_reward.json
    reward = load_reward_model("reward-ensemble")    # an EnsembleReward; scores like any other reward model

Why: reward models trained on noisy preference labels disagree on the pairs that are hard to call, and their
mean is right more often than any one of them (on the world's image pairs, two PickScore models trained apart
agree with the annotators on 79.8% of the held-out pairs against 78.0% and 77.6% alone; docs/world-rewards.md).
Averaging also smooths what a generator being aligned could exploit in one model (Coste et al., "Reward Model
Ensembles Help Mitigate Overoptimization", arXiv 2310.02743).

Scores: a dimension's raw ensemble score is the weighted mean of the members' normalised scores of that dimension
(each member's own `(raw - mean) / std`), so members whose raw scales differ (a learned logit scale, another
backbone) count as their weights say. The ensemble has its own normalisation on top (identity by default;
`fit_normalization` sets it). `probs` is the weighted mean of the members' own `probs`: a mixture of their
preference distributions, each on the raw scores it was trained with.

The members are scored one after another on the same batch; scoring costs the sum of theirs. Training is per
member (`genalign train reward`, then `EnsembleReward([...]).save_pretrained(...)`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import RewardLoadError, RewardModel, load_reward_model

MEMBER_FOLDER = "member-{}"


class EnsembleReward(RewardModel):
    """The weighted mean of reward models with the same dimensions (module docstring)."""

    kind = "ensemble"

    def __init__(self, members: Sequence[RewardModel], weights: Sequence[float] | None = None, **kwargs):
        members = list(members)
        if not members:
            raise ValueError("an ensemble needs at least one member reward model")
        dimensions = members[0].dimensions
        for i, m in enumerate(members):
            if m.dimensions != dimensions:
                raise ValueError(f"ensemble member {i} has dimensions {list(m.dimensions)}, member 0 has "
                                 f"{list(dimensions)}: members must score the same dimensions")
        weights = [1.0] * len(members) if weights is None else [float(w) for w in weights]
        if len(weights) != len(members):
            raise ValueError(f"{len(weights)} weights for {len(members)} ensemble members")
        if any(not (w >= 0 and math.isfinite(w)) for w in weights) or sum(weights) <= 0:
            raise ValueError(f"ensemble weights must be finite, >= 0 and not all 0, got {weights}")
        fps = {m.training_fps for m in members}
        kwargs.setdefault("training_fps", fps.pop() if len(fps) == 1 else None)
        super().__init__(dimensions, **kwargs)
        self.members = nn.ModuleList(members)
        self.differentiable = self.differentiable  # now that the members exist: they follow the ensemble
        self.weights = [w / sum(weights) for w in weights]
        self.overall_dimension = members[0].overall_dimension  # instance attribute: the members' kind decides

    def _score_pixels(self, pixels, prompts, fps) -> dict[str, torch.Tensor]:
        total: dict[str, torch.Tensor] = {}
        for weight, member in zip(self.weights, self.members):
            raw = member._score_pixels(pixels, prompts, fps)
            for d in self.dimensions:
                s = member.normalization[d]
                term = weight * (raw[d].float() - s["mean"]) / s["std"]
                total[d] = total[d] + term if d in total else term
        return total

    @property
    def differentiable(self) -> bool:
        return self._differentiable

    @differentiable.setter
    def differentiable(self, value: bool) -> None:  # the members' `probs` track gradients as the ensemble does
        self._differentiable = bool(value)
        for member in getattr(self, "members", ()):
            member.differentiable = self._differentiable

    def probs(self, media, prompt: str, *, dimension: str | None = None, fps=None) -> torch.Tensor:
        """The weighted mean of the members' `probs` (module docstring)."""
        if not isinstance(prompt, str):
            raise TypeError("probs compares the candidates of ONE prompt: pass a single string")
        return sum(weight * member.probs(media, prompt, dimension=dimension, fps=fps)
                   for weight, member in zip(self.weights, self.members))

    def loss(self, batch):
        raise NotImplementedError("an ensemble is not trained as one model: train each member with `genalign train "
                                  "reward`, then save EnsembleReward([...members]).save_pretrained(folder)")

    # ----------------------------------------------------------------------------------- checkpoints
    def _config(self) -> dict[str, Any]:
        return {"members": [MEMBER_FOLDER.format(i) for i in range(len(self.members))], "weights": self.weights,
                "member_kinds": [m.kind for m in self.members]}

    def _save_weights(self, directory: Path) -> None:
        for i, member in enumerate(self.members):
            member.save_pretrained(directory / MEMBER_FOLDER.format(i))

    @classmethod
    def _from_saved(cls, directory: Path, config: dict[str, Any], **kwargs) -> EnsembleReward:
        names = config.get("members") or []
        if not names:
            raise RewardLoadError(f"{str(directory)!r}: the ensemble's genalign_reward.json names no members")
        members = []
        for name in names:
            folder = directory / name
            if not folder.is_dir():
                raise RewardLoadError(f"{str(directory)!r}: ensemble member folder {name!r} is missing")
            members.append(load_reward_model(folder, **kwargs))
        return cls(members, config.get("weights"))
