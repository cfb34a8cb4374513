"""Pure loss functions, one module per algorithm (ALGORITHMS.md). They take tensors and return
(loss, stats); models, data and optimisation live in genalign.trainers."""

from .contrastive import clip_contrastive_loss
from .flow_dpo import (
    BETA_SCHEDULES,
    DIVERGENCES,
    beta_at,
    f_prime_of_log_ratio,
    flow_dpo_loss,
    per_sample_mse,
)
from .reward import (
    accuracy_with_ties,
    accuracy_without_ties,
    bt_loss,
    btt_log_probs,
    btt_loss,
    pickscore_loss,
    reward_accuracy,
)

__all__ = [
    "BETA_SCHEDULES",
    "DIVERGENCES",
    "accuracy_with_ties",
    "accuracy_without_ties",
    "beta_at",
    "bt_loss",
    "btt_log_probs",
    "btt_loss",
    "clip_contrastive_loss",
    "f_prime_of_log_ratio",
    "flow_dpo_loss",
    "per_sample_mse",
    "pickscore_loss",
    "reward_accuracy",
]
