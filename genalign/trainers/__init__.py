"""Trainers: one file per algorithm on one shared accelerate loop (`genalign.trainers.loop`).

    from genalign.trainers import FlowDPOConfig, FlowDPOTrainer

Importing this package imports torch only; accelerate, diffusers and peft are imported when a trainer is built.
"""

from .flow_dpo import FlowDPOConfig, FlowDPOTrainer, PreferenceCollator
from .loop import (
    CheckpointError,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    TrainResult,
    config_help,
    latest_checkpoint,
    list_checkpoints,
    verify_checkpoint,
)
from .reward import RewardTrainConfig, RewardTrainer

__all__ = [
    "CheckpointError",
    "FlowDPOConfig",
    "FlowDPOTrainer",
    "NonFiniteLossError",
    "PreferenceCollator",
    "RewardTrainConfig",
    "RewardTrainer",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "config_help",
    "latest_checkpoint",
    "list_checkpoints",
    "verify_checkpoint",
]
