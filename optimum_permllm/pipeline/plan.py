"""PruningPlan: what the pipeline does, resolved once from the user's `PermLLMConfig`.

The pipeline and the algorithms read this small frozen dataclass, never the transformers config object,
so they can be called (and tested) without transformers' quantization machinery.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..sparse.nm import NMPattern
from .metrics import METRICS
from .permutations import PERMUTATIONS


@dataclass(frozen=True)
class LearningSettings:
    """How the learned permutation runs (read only when `PruningPlan.learns`)."""

    learner: str = "sinkhorn"
    scope: str = "layer"
    block_size: int = 64
    steps: int | None = None
    lr: float | None = None
    seed: int = 0


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
    def needs_gram(self) -> bool:
        """The metric (`metrics.METRICS`) or the learned permutation's objective reads the input Gram matrix."""
        return METRICS[self.metric].needs_gram or self.learns

    @property
    def needs_calibration(self) -> bool:
        """Pruning needs calibration activations: for the metric's statistics, or to choose a permutation (and
        check its folds)."""
        return METRICS[self.metric].calibrated or PERMUTATIONS[self.permutation].calibrated
