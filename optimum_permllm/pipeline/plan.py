"""PruningPlan: what the pipeline does, resolved once from the user's `PermLLMConfig`.

The pipeline and the algorithms read this small frozen dataclass, never the transformers config object,
so they can be called (and tested) without transformers' quantization machinery.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..algorithms.scores import permutation_metric
from ..sparse.nm import NMPattern


@dataclass(frozen=True)
class LearningSettings:
    """How the learned permutation runs (read only when `PruningPlan.permutation == "learned"`)."""

    learner: str = "sinkhorn"
    scope: str = "layer"
    block_size: int = 64
    steps: int | None = None
    lr: float | None = None
    seed: int = 0


@dataclass(frozen=True)
class PruningPlan:
    """The N:M pattern, the metric that keeps weights (and SparseGPT's dampening), the permutation choice,
    where permutations are folded, which linears stay dense, and the learning settings."""

    pattern: NMPattern
    metric: str = "wanda"
    damp: float = 0.01
    permutation: str = "heuristic"
    fold_permutations: bool | str = True
    modules_to_not_convert: tuple[str, ...] = ()
    learning: LearningSettings = field(default_factory=LearningSettings)

    @property
    def permutation_metric(self) -> str:
        """The score that chooses permutations (see `algorithms.scores.permutation_metric`)."""
        return permutation_metric(self.metric)

    @property
    def needs_gram(self) -> bool:
        """SparseGPT's weight update, the Gram-chosen mask, the least-squares refit and the learned
        permutation's objective need the input Gram matrix."""
        return self.metric in ("sparsegpt", "gram", "lsq") or self.permutation == "learned"
