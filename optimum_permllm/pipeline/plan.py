"""PruningPlan: what the pipeline does, resolved once from the user's `PermLLMConfig`.

The pipeline and the algorithms read this small frozen dataclass, never the transformers config object,
so they can be called (and tested) without transformers' quantization machinery.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..algorithms.learned.settings import LearningSettings
from ..sparse.nm import NMPattern
from .metrics import METRICS
from .permutations import PERMUTATIONS

__all__ = ["LearningSettings", "PruningPlan"]


@dataclass(frozen=True)
class PruningPlan:
    """The N:M pattern, the metric that keeps weights (and SparseGPT's dampening), the permutation choice,
    where permutations are folded, which linears stay dense, and the learning settings.

    `own_permutation` (not a config setting: for research, e.g. research/per_linear_end_to_end.py) names
    linears, as `modules_to_not_convert` does, that are planned as a group of their own, with their own
    permutation, instead of sharing one with the other linears that read their input."""

    pattern: NMPattern
    metric: str = "wanda"
    damp: float = 0.01
    permutation: str = "heuristic"
    fold_permutations: bool | str = True
    modules_to_not_convert: tuple[str, ...] = ()
    learning: LearningSettings = field(default_factory=LearningSettings)
    own_permutation: tuple[str, ...] = ()

    @property
    def learns(self) -> bool:
        """The permutation is learned (`permutations.PERMUTATIONS`), so the `learning` settings apply."""
        return PERMUTATIONS[self.permutation].learns

    @property
    def joint(self) -> bool:
        """The permutations are learned jointly (the `model` scope, PermLLM as published)."""
        return self.learns and self.learning.scope == "model"

    @property
    def needs_gram(self) -> bool:
        """The metric (`metrics.METRICS`) or the `layer` scope's objective reads the input Gram matrix."""
        return METRICS[self.metric].needs_gram or (self.learns and not self.joint)

    @property
    def needs_calibration(self) -> bool:
        """Pruning needs calibration activations: for the metric's statistics, or to choose a permutation (and
        check its folds)."""
        return METRICS[self.metric].calibrated or PERMUTATIONS[self.permutation].calibrated

    def learned_layers(self, num_layers: int) -> range:
        """The decoder layers whose permutations are learned (the last `learning.learned_layers`, or all)."""
        if not self.learns:
            return range(num_layers, num_layers)
        count = self.learning.learned_layers
        if count is not None and count > num_layers:
            raise ValueError(f"learned_layers={count}, but the model has {num_layers} decoder layers: give at most "
                             f"{num_layers} (or None for all).")
        return range(num_layers - (num_layers if count is None else count), num_layers)

    def heuristic(self) -> PruningPlan:
        """This plan with the heuristic permutation (for the layers that do not learn theirs)."""
        return replace(self, permutation="heuristic")
