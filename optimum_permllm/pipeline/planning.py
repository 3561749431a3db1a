"""Decide, for one group of linears sharing an input, the input permutation and each layer's N:M weight.

Tensors in, tensors out: the weights and the group's input statistics go in; a permutation and, per
layer, the pruned weight and mask in permuted column order come out.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from ..algorithms.heuristic_permutation import retained_score
from ..algorithms.scores import score_fn
from ..algorithms.statistics import InputStatistics
from ..sparse.permutation import identity_permutation
from .metrics import METRICS
from .permutations import PERMUTATIONS
from .plan import PruningPlan


@dataclass
class GroupPlan:
    """The permutation of a group's shared input and each member's pruned weight and mask (permuted order)."""

    perm: torch.Tensor
    weights: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)


def plan_group(weights: dict[str, torch.Tensor], stats: InputStatistics | None, plan: PruningPlan,
               learn=None, heads: tuple[int, int] | None = None, perm: torch.Tensor | None = None) -> GroupPlan:
    """Score the group's weights once, choose its permutation on those scores as the plan's permutation choice
    does (`permutations.PERMUTATIONS`), then prune every member in that order as the plan's metric does
    (`metrics.METRICS`).

    `learn(weights, stats, init_perm, input_weights) -> (perm, info)` runs the learned permutation when asked for
    (default: `learn_group_permutation` on the exact `layer` objective); `input_weights` is the per-input factor
    of the scores. `heads` (num_heads, num_kv_heads) restricts the heuristic permutation of an attention output
    to moves inside each head, so that it can be folded into the value projection.
    `stats` may be None for a metric and permutation that read no calibration data. `perm`, when given, is the
    permutation to prune in, chosen beforehand (the `model` scope's joint training).
    """
    metric = METRICS[plan.metric]
    info: dict = {}
    timed = _PartTimer(info, next(iter(weights.values())).device)
    with timed("gram_inverse"):
        input_weights = metric.input_weights(stats, plan.damp)
    dense = {name: w.detach().float() for name, w in weights.items()}
    scores = torch.cat([score_fn(metric.score)(w, input_weights) for w in dense.values()])
    n, m = plan.pattern.n, plan.pattern.m
    info["identity_score"] = retained_score(scores, identity_permutation(scores.shape[1]), n, m)
    learn = learn or (lambda w, s, p, iw: learn_group_permutation(w, s, p, iw, plan))

    def learn_from(init_perm: torch.Tensor) -> torch.Tensor:
        perm, learned_info = learn(list(dense.values()), stats, init_perm, input_weights)
        info.update(learned_info)
        return perm

    if perm is None:
        perm = PERMUTATIONS[plan.permutation].choose(scores, plan.pattern, heads, learn_from, info, timed)
    perm = perm.to(scores.device)
    pruned, masks = metric.prune(dense, scores, stats, perm, plan.pattern, plan.damp, info, timed)
    pruned = {name: w.to(weights[name].dtype) for name, w in pruned.items()}
    return GroupPlan(perm=perm, weights=pruned, masks=masks, info=info)


def learn_group_permutation(weights, stats, init_perm: torch.Tensor, input_weights, plan: PruningPlan, loss_fn=None):
    """Learn one group's permutation from `init_perm` with the plan's learning settings (the `layer` scope's
    learner), score and budget, on the scores' `input_weights` (computed once by `plan_group`); `loss_fn` None is
    the exact `layer` objective. Returns (perm, {"init_loss", "learned_loss"})."""
    from ..algorithms.learned import block_size_for, learn_permutation

    learning = plan.learning
    settings = replace(learning, block_size=block_size_for(weights[0].shape[1], learning.block_size, plan.pattern.m))
    with torch.enable_grad():  # the pruning pass runs under no_grad; learning needs gradients
        result = learn_permutation(weights, stats.gram(), input_weights, plan.pattern.n, plan.pattern.m, settings,
                                   metric=METRICS[plan.metric].score, init_perm=init_perm, loss_fn=loss_fn)
    return result.perm, {"init_loss": result.init_loss, "learned_loss": result.best_loss}


class _PartTimer:
    """Wall seconds of each part of a group's planning, added up in `info["seconds"]` (what the layer log and
    benchmarks/bench_lsq_cost.py report); CUDA work is synchronised so that each part is charged its own time."""

    def __init__(self, info: dict, device: torch.device):
        self.seconds = info.setdefault("seconds", {})
        self.cuda = device.type == "cuda"

    @contextmanager
    def __call__(self, part: str):
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - start
