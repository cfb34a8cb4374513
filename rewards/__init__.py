"""Reward models with one interface (`genalign.rewards.base`): `reward(media, prompts) -> Tensor[B]` or
`dict[str, Tensor[B]]`, `.probs()`, `.differentiable`, normalisation metadata saved with the checkpoint.

    from genalign.rewards import load_reward_model, combine_rewards, CLIPReward, VideoReward

- `CLIPReward` (`clip_reward`): PickScore (arXiv 2305.01569) / HPSv2 (arXiv 2306.09341) style, transformers or
  open_clip backbones;
- `VideoReward` (`video_reward`): VideoReward-style VQ / MQ / TA reward on Qwen2-VL (arXiv 2501.13918);
- `EnsembleReward` (`ensemble`): the mean of several reward models of the same dimensions, one folder;
- `combine_rewards` (`combine`): weighted sums of rewards as one scorer.

The model classes are imported lazily (on first attribute access), so `import genalign.rewards` does not pull
in transformers, open_clip or peft.
"""

from __future__ import annotations

import importlib

from .base import (
    REWARD_CONFIG_NAME,
    RewardInputWarning,
    RewardLoadError,
    RewardModel,
    as_reward_batch,
    collate_reward_pairs,
    detect_reward_kind,
    load_reward_model,
    media_to_unit_pixels,
)
from .combine import CombinedReward, combine_rewards

_LAZY = {
    "CLIPReward": "clip_reward",
    "EnsembleReward": "ensemble",
    "build_clip_tokenizer": "clip_reward",
    "tiny_clip_reward": "clip_reward",
    "VideoReward": "video_reward",
    "VideoRewardConfig": "video_reward",
    "tiny_video_reward": "video_reward",
    "build_tiny_qwen2vl_tokenizer": "video_reward",
    "tiny_qwen2vl_backbone": "video_reward",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "REWARD_CONFIG_NAME",
    "CLIPReward",
    "CombinedReward",
    "EnsembleReward",
    "RewardInputWarning",
    "RewardLoadError",
    "RewardModel",
    "VideoReward",
    "VideoRewardConfig",
    "as_reward_batch",
    "build_clip_tokenizer",
    "build_tiny_qwen2vl_tokenizer",
    "collate_reward_pairs",
    "combine_rewards",
    "detect_reward_kind",
    "load_reward_model",
    "media_to_unit_pixels",
    "tiny_clip_reward",
    "tiny_qwen2vl_backbone",
    "tiny_video_reward",
]
