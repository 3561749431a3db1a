"""Weight scores: the importance of every weight, as float32 [out_features, in_features].

Higher is more important; an N:M mask keeps the top-N scores of every group of M input columns.
All scores share the signature (weight, feature_norms) so callers can pick one by name; which score each
pruning metric ranks with is in `pipeline.metrics.METRICS`.
"""

from __future__ import annotations

from typing import Callable

import torch

from .refit import DampedGram

ScoreFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def magnitude_scores(weight: torch.Tensor, feature_norms: torch.Tensor | None = None) -> torch.Tensor:
    """|W_ij|; `feature_norms` is accepted and ignored so every score has the same signature."""
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


_SCORES: dict[str, ScoreFn] = {"magnitude": magnitude_scores, "wanda": wanda_scores, "ria": ria_scores}


def score_fn(name: str) -> ScoreFn:
    """The score function called `name` ('magnitude', 'wanda' or 'ria')."""
    try:
        return _SCORES[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"Unknown score {name!r}; valid scores: {', '.join(sorted(_SCORES))}.") from None


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
