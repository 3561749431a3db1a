"""Pure pruning algorithms: tensors in, tensors out (no modules, hooks or models)."""

from .heuristic_permutation import heuristic_permutation, quantile_deal, retained_score
from .scores import magnitude_scores, ria_scores, score_fn, wanda_scores
from .sparsegpt import sparsegpt_prune
from .statistics import InputStatistics
from .assignment import batched_assignment
from .learned import BlockPermutation, LayerObjective, LearnResult, LearningSettings, learn_permutation
from .sinkhorn import log_sinkhorn
from .swap_refinement import refine_swaps
