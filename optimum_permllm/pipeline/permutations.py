"""The permutation choices, one entry each: how a group's input permutation is chosen and what that reads.

Everything that depends on the choice reads `PERMUTATIONS`: the plan (`needs_gram`, `needs_calibration`,
`learns`), the planner (`planning.plan_group`) and the layer engine (which groups are chosen inside heads).
The names alone live in `options.PERMUTATIONS` (standard library only, for the commands' --help); a test holds
the two equal. A new choice is one entry here and its tests.

A choose function gets the group's scores concatenated along the rows, the N:M pattern, `heads`
((num_heads, num_kv_heads) to choose inside heads, or None), `learn(init_perm) -> perm` (the planner's learned
step), the group's `info` and its part timer; it returns the permutation and may add to `info`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..algorithms.heuristic_permutation import head_shared_permutation, heuristic_permutation, retained_score
from ..sparse.nm import NMPattern
from ..sparse.permutation import identity_permutation

# Groups per assignment problem in the heuristic permutation of layers wider than 4 blocks: the full
# assignment's cost grows fast past ~1k groups, blocks keep almost all of its gain (BENCHMARKS.md,
# "Heuristic permutation cost").
LSA_BLOCK = 256


@dataclass(frozen=True)
class Permutation:
    """How one permutation choice finds a group's input permutation.

    `choose`: see the module docstring. `calibrated`: choosing it needs calibration activations (its folds are
    checked on them). `learns`: it runs the learned permutation, which reads `PruningPlan.learning` and the
    inputs' Gram matrix. `inside_heads`: with fold_permutations="all" an attention output's permutation is
    chosen inside heads, so that it folds into v_proj.
    """

    choose: Callable[..., torch.Tensor]
    calibrated: bool = True
    learns: bool = False
    inside_heads: bool = False


def keep_order(scores: torch.Tensor, pattern: NMPattern, heads, learn, info: dict, timed) -> torch.Tensor:
    """The identity: the group's columns stay in their order."""
    return identity_permutation(scores.shape[1], scores.device)


def heuristic_order(scores: torch.Tensor, pattern: NMPattern, heads=None) -> torch.Tensor:
    """RIA's channel permutation of a group's concatenated `scores` (inside heads when `heads` is given), in
    blocks of LSA_BLOCK groups for wide layers."""
    n, m = pattern.n, pattern.m
    if heads is not None:
        return head_shared_permutation(scores, *heads, n, m)
    wide = scores.shape[1] // m > 4 * LSA_BLOCK
    return heuristic_permutation(scores, n, m, max_groups_per_lsa=LSA_BLOCK if wide else None)


def heuristic(scores: torch.Tensor, pattern: NMPattern, heads, learn, info: dict, timed) -> torch.Tensor:
    """`heuristic_order`, timed; records the scores it keeps."""
    with timed("permutation"):
        perm = heuristic_order(scores, pattern, heads)
    info["heuristic_score"] = retained_score(scores, perm, pattern.n, pattern.m)
    return perm


def learned(scores: torch.Tensor, pattern: NMPattern, heads, learn, info: dict, timed) -> torch.Tensor:
    """PermLLM's learned permutation, started from the heuristic one."""
    init_perm = heuristic(scores, pattern, heads, learn, info, timed)
    with timed("learned_permutation"):
        return learn(init_perm)


PERMUTATIONS: dict[str, Permutation] = {
    "none": Permutation(keep_order, calibrated=False),
    "heuristic": Permutation(heuristic, inside_heads=True),
    "learned": Permutation(learned, learns=True),
}
