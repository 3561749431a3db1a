"""One-shot pruning metrics: the importance of every weight, as float32 [out_features, in_features].

Higher is more important; an N:M mask keeps the top-N scores of every group of M input columns.
All metrics share the signature (weight, feature_norms) so callers can pick one by name.
"""

from __future__ import annotations

from typing import Callable

import torch

from .refit import DampedGram

ScoreFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def magnitude_scores(weight: torch.Tensor, feature_norms: torch.Tensor | None = None) -> torch.Tensor:
    """|W_ij|; `feature_norms` is accepted and ignored so every metric has the same signature."""
    return weight.detach().float().abs()


def wanda_scores(weight: torch.Tensor, feature_norms: torch.Tensor) -> torch.Tensor:
    """Wanda: |W_ij| * ||X_j||_2."""
    return magnitude_scores(weight) * _checked_norms(weight, feature_norms, "wanda")


def ria_scores(weight: torch.Tensor, feature_norms: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """RIA: (|W_ij| / sum_i |W_ij| + |W_ij| / sum_j |W_ij|) * ||X_j||_2 ** alpha (relative importance)."""
    w = magnitude_scores(weight)
    tiny = torch.finfo(torch.float32).tiny  # an all-zero row or column scores 0 instead of 0/0
    column_sums = w.sum(dim=0, keepdim=True).clamp_min(tiny)
    row_sums = w.sum(dim=1, keepdim=True).clamp_min(tiny)
    return (w / column_sums + w / row_sums) * _checked_norms(weight, feature_norms, "ria").pow(alpha)


_METRICS: dict[str, ScoreFn] = {"magnitude": magnitude_scores, "wanda": wanda_scores, "ria": ria_scores}


def score_fn(metric: str) -> ScoreFn:
    """The scoring function called `metric` ('magnitude', 'wanda' or 'ria')."""
    try:
        return _METRICS[metric.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"Unknown pruning metric {metric!r}; valid metrics: {', '.join(sorted(_METRICS))}.") from None


def permutation_metric(metric: str) -> str:
    """The score that chooses channel permutations (heuristic and learned) for a pruning `metric`.

    The permutation is chosen for the mask the metric will keep, so it is scored by that metric:
    'magnitude' -> |W|, 'wanda' -> Wanda, 'ria' -> RIA. SparseGPT has no score of its own (it decides
    masks from the Hessian while updating weights), so it is permuted by Wanda, its usual companion; the
    Gram-chosen mask starts from Wanda's mask in the chosen permutation, so it is permuted by Wanda too.
    'lsq' uses Wanda's score form with `obs_feature_weights` in place of the feature norms (the
    pipeline passes them), since its refit is the full compensation that saliency assumes.
    """
    return "wanda" if metric in ("sparsegpt", "gram", "lsq") else metric


def obs_feature_weights(system: DampedGram) -> torch.Tensor:
    """1 / sqrt([G^-1]_jj) on the damped Gram matrix: the norm of what the other inputs cannot rebuild of
    input j. In place of ||x_j|| in Wanda's score it gives the square root of the OBS saliency
    w^2 / [G^-1]_jj: the error of pruning one weight when all the others are refitted to compensate.
    An input never active in calibration (G_jj = 0) gets 0: pruning its weights costs nothing."""
    return torch.diagonal(system.inverse).rsqrt().masked_fill(system.dead, 0.0)


def _checked_norms(weight: torch.Tensor, feature_norms: torch.Tensor | None, metric: str) -> torch.Tensor:
    """The feature norms as a float32 [1, in_features] row, or a clear error if they do not fit."""
    if feature_norms is None:
        raise ValueError(f"The {metric} metric needs the input feature norms (InputStatistics.feature_norms()).")
    if feature_norms.shape != (weight.shape[-1],):
        raise ValueError(
            f"feature_norms has shape {tuple(feature_norms.shape)} but the weight has {weight.shape[-1]} input features."
        )
    return feature_norms.detach().to(device=weight.device, dtype=torch.float32).unsqueeze(0)
