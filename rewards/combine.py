"""Weighted combinations of reward models, as one scorer a trainer or a guidance rule can call.

    scorer = combine_rewards({"pickscore": 0.5, "videoreward.TA": 1.0},
                             models={"pickscore": clip_reward, "videoreward": video_reward})
    total = scorer(videos, prompts)                 # Tensor[B] = 0.5 * pickscore + 1.0 * videoreward TA
    terms = scorer.terms(videos, prompts)           # {"pickscore": Tensor[B], "videoreward.TA": Tensor[B]}

A key is a model name, or "name.DIMENSION" for one dimension of a multi-dimensional model; a bare name of a
multi-dimensional model means its overall dimension. Each model is called once per batch, whatever number of
its dimensions are used. Models may be given as folders (loaded with `load_reward_model`). Scores are each
model's default output (normalised unless the model was loaded with `normalize=False`), so normalised
dimensions add on comparable scales.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from .base import RewardModel, load_reward_model


def _split_key(key: str, models: Mapping[str, RewardModel]) -> tuple[str, str | None]:
    """"name" or "name.DIM" -> (model name, dimension or None); model names may themselves contain dots."""
    if key in models:
        return key, None
    name, dot, dim = key.rpartition(".")
    if dot and name in models:
        return name, dim
    raise KeyError(f"reward weight {key!r} names no model; models given: {sorted(models)} (use 'name' or "
                   "'name.DIMENSION')")


class CombinedReward(nn.Module):
    """`sum_k weight_k * score_k(media, prompts)`; see the module docstring."""

    def __init__(self, weights: Mapping[str, float], models: Mapping[str, RewardModel]):
        super().__init__()
        if not weights:
            raise ValueError("combine_rewards needs at least one weight")
        self.models = dict(models)  # names may contain dots, which nn.ModuleDict does not allow
        self.model_list = nn.ModuleList(list(self.models.values()))  # registered so .to() / .eval() reach them
        self.terms_used: list[tuple[str, str, str, float]] = []  # (key, model name, dimension, weight)
        for key, weight in weights.items():
            name, dim = _split_key(key, models)
            model = models[name]
            if dim is None:
                if model.is_multi_dimensional:
                    if not model.overall_dimension:
                        raise KeyError(f"{name!r} has several dimensions {list(model.output_dimensions)}: name one, "
                                       f"e.g. '{name}.{model.dimensions[0]}'")
                    dim = model.overall_dimension
                else:
                    dim = model.dimensions[0]
            if dim not in model.output_dimensions:
                raise KeyError(f"reward weight {key!r}: model {name!r} has no dimension {dim!r} (it has "
                               f"{list(model.output_dimensions)})")
            self.terms_used.append((key, name, dim, float(weight)))

    @property
    def differentiable(self) -> bool:
        return all(self.models[name].differentiable for name in {t[1] for t in self.terms_used})

    def terms(self, media, prompts, **kwargs) -> dict[str, torch.Tensor]:
        """Each weighted term's (unweighted) score, keyed like the weights."""
        needed = list(dict.fromkeys(t[1] for t in self.terms_used))
        scores = {name: self.models[name].score_dict(media, prompts, **kwargs) for name in needed}
        return {key: scores[name][dim] for key, name, dim, _ in self.terms_used}

    def forward(self, media, prompts, **kwargs) -> torch.Tensor:
        terms = self.terms(media, prompts, **kwargs)
        return sum(weight * terms[key] for key, _, _, weight in self.terms_used)


def combine_rewards(weights: Mapping[str, float],
                    models: Mapping[str, RewardModel | str | os.PathLike]) -> CombinedReward:
    """A callable scorer `(media, prompts) -> Tensor[B]`: the weighted sum of the named rewards (module doc)."""
    loaded = {name: m if isinstance(m, RewardModel) else load_reward_model(m) for name, m in models.items()}
    return CombinedReward(weights, loaded)
