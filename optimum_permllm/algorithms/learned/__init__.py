"""Learned channel permutations (PermLLM): settings, parametrisation, mask surrogates, objectives, optimisation,
and the `layer` scope's per-group learner. The `model` scope's joint training runs decoder layers, so it lives
in the pipeline (pipeline/joint_training.py) and uses the pieces here."""

from .group import LearnResult, learn_permutation
from .masks import masked_weight, soft_nm_mask
from .objectives import LayerObjective, cosine_loss, feature_scale
from .parametrisation import BlockPermutation, block_size_for, straight_through
from .settings import LearningSettings

__all__ = ["BlockPermutation", "LayerObjective", "LearnResult", "LearningSettings", "block_size_for", "cosine_loss",
           "feature_scale", "learn_permutation", "masked_weight", "soft_nm_mask", "straight_through"]
