"""PruningPlan: what the pipeline does, resolved once from the user's `PermLLMConfig`.

The pipeline and the algorithms read this small frozen dataclass, never the transformers config object,
so they can be called (and tested) without transformers' quantization machinery.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..algorithms.learned.settings import LearningSettings
from ..algorithms.scores import permutation_metric
from ..sparse.nm import NMPattern

__all__ = ["LearningSettings", "PruningPlan"]


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
        """SparseGPT's weight update, the Gram-chosen mask, the least-squares refit and the `layer` scope's
        objective need the input Gram matrix."""
        return self.metric in ("sparsegpt", "gram", "lsq") or (self.permutation == "learned"
                                                                and self.learning.scope == "layer")

    @property
    def joint(self) -> bool:
        """True when the permutations are learned jointly (the `model` scope, PermLLM as published)."""
        return self.permutation == "learned" and self.learning.scope == "model"

    def learned_layers(self, num_layers: int) -> range:
        """The decoder layers whose permutations are learned (the last `learning.learned_layers`, or all)."""
        if self.permutation != "learned":
            return range(num_layers, num_layers)
        count = self.learning.learned_layers
        if count is not None and count > num_layers:
            raise ValueError(f"learned_layers={count}, but the model has {num_layers} decoder layers: give at most "
                             f"{num_layers} (or None for all).")
        return range(num_layers - (num_layers if count is None else count), num_layers)

    def heuristic(self) -> PruningPlan:
        """This plan with the heuristic permutation (for the layers that do not learn theirs)."""
        return replace(self, permutation="heuristic")
