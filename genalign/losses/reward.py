"""Reward-model losses and accuracy metrics: pure functions over per-item scores (ALGORITHMS.md section 3).

Labels everywhere: `1.0` = A (the first item) wins, `0.0` = B wins, `0.5` = tie, `NaN` (or any other value) =
no valid label. Scores are the reward model's outputs for A and B, shape (B,) or (B, D) for D dimensions.

Losses (each returns `(mean loss, stats)` like the other genalign losses; stats hold detached tensors):

- `bt_loss`: Bradley-Terry, `-log sigmoid(r_A - r_B)` when A wins (plain BT, for data without ties). A tie is a
  soft label (`-(0.5 log sigmoid(D) + 0.5 log sigmoid(-D))`) or left out (`ties="mask"`).
- `btt_loss`: Bradley-Terry with ties (Rao-Kupper), the loss of VideoReward (Liu et al., "Improving Video
  Generation with Human Feedback", arXiv 2501.13918). With `D = r_A - r_B` and tie parameter theta > 1:

      P(A wins) = sigmoid(D - log theta),   P(B wins) = sigmoid(-D - log theta),
      P(tie)    = (theta^2 - 1) * P(A wins) * P(B wins)

  (the three sum to one) and the loss is the negative log-likelihood of the label. theta = 5 by default, as in
  VideoReward. Invalid labels are masked OUT of the mean (not averaged in as zeros).
- `pickscore_loss`: PickScore's objective (Kirstain et al., "Pick-a-Pic", arXiv 2305.01569): cross-entropy
  between the softmax over a pair's two scores and the label distribution `[label, 1 - label]` (tie =
  `[0.5, 0.5]`).

Accuracy (ALGORITHMS.md 3d), on `delta = r_A - r_B`:

- `accuracy_without_ties`: `C / (C + D + T_model)` over the pairs the human labelled with a winner; C = the
  model orders the pair as the human did, D = the opposite, T_model = the model gives both the same score.
- `accuracy_with_ties`: the tie-calibrated accuracy of "Ties Matter" (Deutsch et al., arXiv 2305.14324): the
  model predicts a tie when `|delta| < epsilon`; epsilon is swept over every value that changes a prediction
  and the best `(C + T_both) / (all pairs)` is reported with its epsilon (T_both = both human and model say tie).
- `reward_accuracy`: both, per dimension, from dicts of scores and labels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

A_WINS, B_WINS, TIE = 1.0, 0.0, 0.5
DEFAULT_TIE_THETA = 5.0


def _label_tensor(label, like: torch.Tensor) -> torch.Tensor:
    """Labels as a float tensor broadcast to `like` (NaN stays NaN); (B,) labels with (B, D) scores apply to
    every dimension."""
    y = torch.as_tensor(label, dtype=like.dtype, device=like.device)
    if y.ndim == 1 and like.ndim == 2:
        y = y[:, None]
    return y.expand_as(like)


def _masked_mean(losses: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the valid entries only; 0 (still attached to the graph) when none is valid."""
    n_valid = valid.sum()
    total = torch.where(valid, losses, torch.zeros_like(losses)).sum()
    return total / n_valid.clamp(min=1)


def _pair_stats(delta: torch.Tensor, label: torch.Tensor, losses: torch.Tensor, valid: torch.Tensor) -> dict:
    """Detached diagnostics shared by the pairwise losses."""
    with torch.no_grad():
        decided = valid & ((label == A_WINS) | (label == B_WINS))
        correct = torch.where(label == A_WINS, delta > 0, delta < 0)
        acc = correct[decided].float().mean() if decided.any() else torch.tensor(float("nan"))
        stats = {
            "losses": torch.where(valid, losses, torch.full_like(losses, float("nan"))).detach(),
            "valid": valid.detach(),
            "num_valid": valid.sum().detach(),
            "accuracy": acc,  # share of decided pairs ranked as labelled (NaN when there is none)
            "margin_mean": delta[valid].mean().detach() if valid.any() else torch.tensor(float("nan")),
        }
        if delta.ndim == 2:  # per dimension
            per_dim = []
            for d in range(delta.shape[1]):
                v = valid[:, d]
                per_dim.append(losses[:, d][v].mean() if v.any() else torch.tensor(float("nan")))
            stats["loss_per_dim"] = torch.stack(per_dim).detach()
    return stats


def bt_loss(
    reward_a: torch.Tensor, reward_b: torch.Tensor, label, ties: str = "soft"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plain Bradley-Terry loss `-(y log sigmoid(D) + (1 - y) log sigmoid(-D))`, `D = r_A - r_B`.

    reward_a, reward_b: (B,) or (B, D). label: (B,), (B, D) or a scalar; y in [0, 1] is the probability that A
    wins (1 / 0 for a winner, 0.5 for a tie). ties: "soft" (a tie is the symmetric soft label) or "mask" (ties
    are left out like invalid labels). Labels outside [0, 1] or NaN are left out of the mean.
    """
    if ties not in ("soft", "mask"):
        raise ValueError(f"ties must be 'soft' or 'mask', got {ties!r}")
    dtype = torch.promote_types(reward_a.dtype, torch.float32)
    delta = reward_a.to(dtype) - reward_b.to(dtype)
    y = _label_tensor(label, delta)
    valid = (y >= 0) & (y <= 1)  # False for NaN
    if ties == "mask":
        valid = valid & (y != TIE)
    y_safe = torch.where(valid, y, torch.zeros_like(y))
    losses = -(y_safe * F.logsigmoid(delta) + (1 - y_safe) * F.logsigmoid(-delta))
    return _masked_mean(losses, valid), _pair_stats(delta, y, losses, valid)


def btt_log_probs(delta: torch.Tensor, theta: float = DEFAULT_TIE_THETA) -> dict[str, torch.Tensor]:
    """log P(A wins), log P(B wins), log P(tie) under Rao-Kupper with tie parameter theta (> 1)."""
    if not theta > 1:
        raise ValueError(f"the tie parameter theta must be > 1, got {theta}")
    log_theta = math.log(theta)
    log_p_a = F.logsigmoid(delta - log_theta)
    log_p_b = F.logsigmoid(-delta - log_theta)
    log_p_tie = log_p_a + log_p_b + math.log(theta**2 - 1)
    return {"A": log_p_a, "B": log_p_b, "tie": log_p_tie}


def btt_loss(
    reward_a: torch.Tensor, reward_b: torch.Tensor, label, theta: float = DEFAULT_TIE_THETA
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry-with-ties loss of VideoReward (arXiv 2501.13918), see the module docstring.

    reward_a, reward_b: (B,) or (B, D) scores (one column per dimension, e.g. VQ, MQ, TA). label: same shape,
    (B,) broadcast over dimensions, or a scalar: 1 = A wins, 0 = B wins, 0.5 = tie; anything else (NaN for a
    missing label) is masked out of the mean. Returns (mean over valid entries, stats); with no valid entry
    the loss is 0 and still attached to the graph.
    """
    dtype = torch.promote_types(reward_a.dtype, torch.float32)
    delta = reward_a.to(dtype) - reward_b.to(dtype)
    y = _label_tensor(label, delta)
    log_p = btt_log_probs(delta, theta)
    is_a, is_b, is_tie = y == A_WINS, y == B_WINS, y == TIE
    valid = is_a | is_b | is_tie
    losses = -torch.where(is_a, log_p["A"], torch.where(is_b, log_p["B"], log_p["tie"]))
    return _masked_mean(losses, valid), _pair_stats(delta, y, losses, valid)


def pickscore_loss(
    scores_a: torch.Tensor, scores_b: torch.Tensor, label
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PickScore's objective (arXiv 2305.01569): cross-entropy of softmax([s_A, s_B]) against [y, 1 - y].

    scores_*: (B,) scores `exp(logit_scale) * cos(image, text)` of the two images of each pair. label: (B,) or
    a scalar, the probability that A is preferred (1, 0, or 0.5 for a tie); NaN / out-of-range labels are
    masked out of the mean.
    """
    dtype = torch.promote_types(scores_a.dtype, torch.float32)
    scores = torch.stack([scores_a.to(dtype), scores_b.to(dtype)], dim=-1)  # (B, 2)
    log_probs = torch.log_softmax(scores, dim=-1)
    y = _label_tensor(label, scores[..., 0])
    valid = (y >= 0) & (y <= 1)
    y_safe = torch.where(valid, y, torch.zeros_like(y))
    target = torch.stack([y_safe, 1 - y_safe], dim=-1)
    losses = -(target * log_probs).sum(dim=-1)
    return _masked_mean(losses, valid), _pair_stats(scores[..., 0] - scores[..., 1], y, losses, valid)


# ------------------------------------------------------------------------------------------- accuracy
def _as_flat_float(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64).reshape(-1).cpu()


def accuracy_without_ties(delta, label) -> dict[str, float]:
    """`C / (C + D + T_model)` over the pairs with a human winner (label 1 or 0); ties and invalid labels are
    left out. delta = r_A - r_B per pair. Returns accuracy (NaN with no such pair) and the counts."""
    delta, label = _as_flat_float(delta), _as_flat_float(label)
    decided = (label == A_WINS) | (label == B_WINS)
    d, y = delta[decided], label[decided]
    concordant = int((((d > 0) & (y == A_WINS)) | ((d < 0) & (y == B_WINS))).sum())
    model_ties = int((d == 0).sum())
    discordant = int(d.numel()) - concordant - model_ties
    n = concordant + discordant + model_ties
    return {
        "accuracy": concordant / n if n else float("nan"),
        "concordant": concordant,
        "discordant": discordant,
        "model_ties": model_ties,
        "pairs": n,
    }


def accuracy_with_ties(delta, label) -> dict[str, float]:
    """Tie-calibrated accuracy ("Ties Matter", arXiv 2305.14324) over all pairs with a valid label.

    The model predicts a tie when `|delta| < epsilon`, else the sign of delta. Every epsilon that changes a
    prediction is tried: 0 (no model ties), the midpoints between consecutive distinct |delta| values, and
    max|delta| + 1 (everything a tie). Reported: the best `(C + T_both) / N` (C = decided by both and in the
    same direction, T_both = tie for both), the smallest epsilon reaching it, and its counts.
    """
    delta, label = _as_flat_float(delta), _as_flat_float(label)
    valid = (label == A_WINS) | (label == B_WINS) | (label == TIE)
    delta, label = delta[valid], label[valid]
    n = int(delta.numel())
    if n == 0:
        return {"accuracy": float("nan"), "epsilon": float("nan"), "correct": 0, "tie_both": 0, "pairs": 0}

    order = torch.argsort(delta.abs(), stable=True)
    abs_sorted, label_sorted, delta_sorted = delta.abs()[order], label[order], delta[order]
    human_tie = (label_sorted == TIE).double()
    # a pair the model decides (|delta| >= epsilon) counts when its sign matches the human's winner
    decided_right = (((delta_sorted > 0) & (label_sorted == A_WINS)) | ((delta_sorted < 0) & (label_sorted == B_WINS)))
    decided_right = decided_right.double()
    # with the first m pairs (smallest |delta|) predicted as ties: T_both(m) + C(m)
    ties_cum = torch.cat([torch.zeros(1, dtype=torch.float64), human_tie.cumsum(0)])
    right_cum = torch.cat([torch.zeros(1, dtype=torch.float64), decided_right.cumsum(0)])
    right_total = right_cum[-1]

    # only m at the end of a run of equal |delta| values are reachable by a threshold
    values = abs_sorted.tolist()
    candidates = [(0, 0.0)]  # (m, epsilon)
    for m in range(1, n + 1):
        if m < n and values[m] == values[m - 1]:
            continue
        eps = (values[m - 1] + values[m]) / 2 if m < n else values[-1] + 1.0
        candidates.append((m, eps))
    best = None
    for m, eps in candidates:
        score = float(ties_cum[m] + (right_total - right_cum[m]))
        if best is None or score > best[0]:
            best = (score, m, eps)
    score, m, eps = best
    return {
        "accuracy": score / n,
        "epsilon": eps,
        "correct": int(right_total - right_cum[m]),
        "tie_both": int(ties_cum[m]),
        "pairs": n,
    }


def reward_accuracy(
    scores_a: Mapping[str, torch.Tensor] | torch.Tensor,
    scores_b: Mapping[str, torch.Tensor] | torch.Tensor,
    labels: Mapping[str, torch.Tensor] | torch.Tensor,
) -> dict[str, dict[str, float]]:
    """Both accuracies per dimension: `{dim: {"accuracy_without_ties", "accuracy_with_ties", "epsilon",
    "pairs_without_ties", "pairs_with_ties"}}`. Tensors (not dicts) are one dimension named "score"."""
    if not isinstance(scores_a, Mapping):
        scores_a, scores_b, labels = {"score": scores_a}, {"score": scores_b}, {"score": labels}
    out = {}
    for dim, label in labels.items():
        if dim not in scores_a or dim not in scores_b:
            raise KeyError(f"labels have dimension {dim!r} but the scores have {sorted(scores_a)}")
        delta = _as_flat_float(scores_a[dim]) - _as_flat_float(scores_b[dim])
        without, with_ties = accuracy_without_ties(delta, label), accuracy_with_ties(delta, label)
        out[dim] = {
            "accuracy_without_ties": without["accuracy"],
            "accuracy_with_ties": with_ties["accuracy"],
            "epsilon": with_ties["epsilon"],
            "pairs_without_ties": without["pairs"],
            "pairs_with_ties": with_ties["pairs"],
        }
    return out
