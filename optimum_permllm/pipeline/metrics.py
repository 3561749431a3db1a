"""The pruning metrics, one entry each: the score that ranks weights, what it reads, how it prunes a group.

Everything that depends on the metric reads `METRICS`: the plan (`needs_gram`, `needs_calibration`), the
planner (`planning.plan_group`) and the pre-flight checks (`preflight.warn_few_tokens`). The names alone live in `options.METRICS` (standard library only, for the
commands' --help); a test holds the two equal. A new metric is one entry here and its tests.

A prune function gets the group's dense float32 weights (original column order), their scores concatenated
along the rows, the inputs' statistics, the chosen permutation, the N:M pattern and the dampening; it returns
each member's pruned float32 weight and mask in permuted column order, and may add to the group's `info`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..algorithms.gram_mask import gram_mask
from ..algorithms.refit import FEW_TOKENS_PER_INPUT, DampedGram, evidence_damp, refit_best_of
from ..algorithms.scores import obs_feature_weights
from ..algorithms.sparsegpt import sparsegpt_prune
from ..algorithms.statistics import InputStatistics
from ..sparse.nm import NMPattern, nm_mask

Pruned = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Metric:
    """How one metric prunes a group of linears that share an input.

    `score`: the score (`algorithms.scores.score_fn`) that ranks the weights: the permutation (heuristic and
    learned) is chosen on it and the first N:M mask keeps its top N. `input_weights(stats, damp)`: that
    score's per-input factor (None for |W|). `prune`: see the module docstring. `needs_gram`: the statistics
    must track the inputs' Gram matrix. `calibrated`: pruning needs calibration activations.
    `tokens_per_input`: for a metric that refits the kept weights on the calibration inputs, the calibration
    tokens per input of the widest layer below which the refit fits that text more than the layer (0: none).
    """

    score: str
    input_weights: Callable[[InputStatistics | None, float], torch.Tensor | None]
    prune: Callable[..., Pruned]
    needs_gram: bool = False
    calibrated: bool = True
    tokens_per_input: int = 0

    @property
    def ships_score_mask(self) -> bool:
        """Whether the shipped mask is the score's top-N mask, the one the joint training's forward pass uses."""
        return self.prune is prune_by_score


def no_input_weights(stats: InputStatistics | None, damp: float) -> None:
    """|W| alone: no factor per input, so no calibration statistics."""
    return None


def feature_norms(stats: InputStatistics, damp: float) -> torch.Tensor:
    """||x_j|| over the calibration tokens (Wanda's and RIA's activation term)."""
    return stats.feature_norms()


def obs_weights(stats: InputStatistics, damp: float) -> torch.Tensor:
    """The OBS weights 1 / sqrt([G^-1]_jj) on the damped Gram matrix (`algorithms.scores.obs_feature_weights`)."""
    return obs_feature_weights(DampedGram.from_gram(stats.gram(), damp))


def prune_by_score(dense, scores, stats, perm, pattern: NMPattern, damp, info, timed) -> Pruned:
    """Keep the top-N scores of every M permuted columns; the kept weights are unchanged."""
    keep = nm_mask(scores[:, perm], pattern.n, pattern.m)
    return _per_member(_stacked(dense)[:, perm].masked_fill(~keep, 0), dense), _per_member(keep, dense)


def prune_gram(dense, scores, stats, perm, pattern: NMPattern, damp, info, timed) -> Pruned:
    """The scores' mask improved on the exact output error over the calibration inputs; weights unchanged."""
    permuted = _stacked(dense)[:, perm]
    with timed("gram_mask"):
        keep = gram_mask(permuted, stats.gram()[perm][:, perm], nm_mask(scores[:, perm], pattern.n, pattern.m),
                         pattern.n, pattern.m)
    return _per_member(permuted.masked_fill(~keep, 0), dense), _per_member(keep, dense)


def prune_sparsegpt(dense, scores, stats, perm, pattern: NMPattern, damp, info, timed) -> Pruned:
    """SparseGPT: masks chosen from the Hessian while the kept weights are updated to compensate."""
    with timed("sparsegpt"):
        pruned, keep = sparsegpt_prune(_stacked(dense), stats.hessian(), pattern.n, pattern.m,
                                       perm=perm, damp=damp)
    return _per_member(pruned, dense), _per_member(keep, dense)


def prune_lsq(dense, scores, stats, perm, pattern: NMPattern, damp, info, timed) -> Pruned:
    """Per row two candidate masks, SparseGPT's (with its update) and the Gram-chosen one; the refit's
    dampening estimated from SparseGPT's updates of the whole group (`evidence_damp`); then every row
    refitted on both and the better kept. SparseGPT's candidate starts from its own update."""
    n, m = pattern.n, pattern.m
    stacked = _stacked(dense)
    permuted, gram = stacked[:, perm], stats.gram()[perm][:, perm]
    with timed("gram_mask"):
        chosen = gram_mask(permuted, gram, nm_mask(scores[:, perm], n, m), n, m)
    with timed("sparsegpt"):
        updated, sparsegpt_mask = sparsegpt_prune(stacked, stats.hessian(), n, m, perm=perm, damp=damp)
    with timed("gram_inverse"):
        refit_damp = max(damp, evidence_damp(permuted, updated, sparsegpt_mask, gram, stats.num_tokens))
        system = DampedGram.from_gram(gram, refit_damp)
    with timed("refit"):
        weights, keep, fits = refit_best_of(permuted, system, [sparsegpt_mask, chosen], starts=[updated, None])
    _record_refit(info, dense, fits)
    info["damp"] = refit_damp
    return _per_member(weights, dense), _per_member(keep, dense)


# The permutation is chosen for the mask the metric keeps, so on the metric's own score where it has one.
# SparseGPT decides its masks from the Hessian while updating weights, so it is permuted by Wanda, its usual
# companion; the Gram-chosen mask starts from Wanda's mask. lsq uses Wanda's form with the OBS weights in place
# of ||x_j||: its refit is the full compensation that the OBS saliency assumes (on the plan's damp).
METRICS: dict[str, Metric] = {
    "magnitude": Metric("magnitude", no_input_weights, prune_by_score, calibrated=False),
    "wanda": Metric("wanda", feature_norms, prune_by_score),
    "ria": Metric("ria", feature_norms, prune_by_score),
    "gram": Metric("wanda", feature_norms, prune_gram, needs_gram=True),
    "sparsegpt": Metric("wanda", feature_norms, prune_sparsegpt, needs_gram=True),
    "lsq": Metric("wanda", obs_weights, prune_lsq, needs_gram=True, tokens_per_input=FEW_TOKENS_PER_INPUT),
}


def _stacked(dense: dict[str, torch.Tensor]) -> torch.Tensor:
    """The group's weights stacked along the rows. The members share the input, so each metric prunes their
    stacked rows in one call (one factorisation, one column sweep); `_per_member` splits the result back."""
    return torch.cat(list(dense.values()))


def _per_member(rows: torch.Tensor, dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A tensor over the group's stacked rows split back into one block per member."""
    return dict(zip(dense, torch.split(rows, [w.shape[0] for w in dense.values()])))


def _record_refit(info: dict, dense: dict[str, torch.Tensor], fits) -> None:
    """Per linear and candidate mask: the refit's iterations (largest, mean) and rows stopped at the cap."""
    per_fit = [(_per_member(fit.iterations, dense), _per_member(fit.converged, dense)) for fit in fits]
    for name in dense:
        info.setdefault("refit", {})[name] = [
            {"iterations_max": int(iterations[name].max()),
             "iterations_mean": round(float(iterations[name].float().mean()), 2),
             "unconverged_rows": int((~converged[name]).sum())} for iterations, converged in per_fit]
