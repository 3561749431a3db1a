"""Decide, for one group of linears sharing an input, the input permutation and each layer's N:M weight.

Tensors in, tensors out: the weights and the group's input statistics go in; a permutation and, per
layer, the pruned weight and mask in permuted column order come out.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from ..algorithms.gram_mask import gram_mask
from ..algorithms.heuristic_permutation import head_shared_permutation, heuristic_permutation, retained_score
from ..algorithms.refit import DampedGram, evidence_damp, refit_best_of
from ..algorithms.scores import obs_feature_weights, score_fn
from ..algorithms.sparsegpt import sparsegpt_prune
from ..algorithms.statistics import InputStatistics
from ..sparse.nm import nm_mask
from ..sparse.permutation import identity_permutation
from .plan import PruningPlan

# Groups per assignment problem in the heuristic permutation of layers wider than 4 blocks: the full
# assignment's cost grows fast past ~1k groups, blocks keep almost all of its gain (BENCHMARKS.md,
# "Heuristic permutation cost").
LSA_BLOCK = 256


@dataclass
class GroupPlan:
    """The permutation of a group's shared input and each member's pruned weight and mask (permuted order)."""

    perm: torch.Tensor
    weights: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)


def plan_group(weights: dict[str, torch.Tensor], stats: InputStatistics, plan: PruningPlan,
               heads: tuple[int, int] | None = None, perm: torch.Tensor | None = None) -> GroupPlan:
    """Choose the group's permutation (the learned one: the `layer` scope's, from the heuristic), then prune
    every member in that order.

    `heads` (num_heads, num_kv_heads) restricts the heuristic permutation of an attention output to
    moves inside each head, so that it can be folded into the value projection.
    `perm`, when given, is the permutation to prune in (chosen beforehand: the `model` scope's joint training).
    """
    n, m = plan.pattern.n, plan.pattern.m
    info: dict = {}
    timed = _PartTimer(info, next(iter(weights.values())).device)
    with timed("gram_inverse"):
        norms = score_norms(stats, plan)
    dense = {name: w.detach().float() for name, w in weights.items()}
    scores = torch.cat([score_fn(plan.permutation_metric)(w, norms) for w in dense.values()])
    width = scores.shape[1]
    info["identity_score"] = retained_score(scores, identity_permutation(width), n, m)
    if perm is not None:
        perm = perm.to(scores.device)
    elif plan.permutation in ("heuristic", "learned"):
        with timed("permutation"):
            perm = heuristic_group_permutation(scores, plan, heads)
        info["heuristic_score"] = retained_score(scores, perm, n, m)
        if plan.permutation == "learned":
            with timed("learned_permutation"):
                perm, learned_info = learn_group_permutation(list(dense.values()), stats, perm, plan, norms=norms)
            info.update(learned_info)
    else:
        perm = identity_permutation(width, scores.device)
    pruned, masks = _prune_members(weights, dense, scores, stats, perm, plan, info, timed)
    return GroupPlan(perm=perm, weights=pruned, masks=masks, info=info)


def heuristic_group_permutation(scores: torch.Tensor, plan: PruningPlan, heads: tuple[int, int] | None = None):
    """The heuristic permutation of a group's concatenated `scores` (inside heads when `heads` is given)."""
    n, m = plan.pattern.n, plan.pattern.m
    if heads is not None:
        return head_shared_permutation(scores, *heads, n, m)
    groups = scores.shape[1] // m
    return heuristic_permutation(scores, n, m, max_groups_per_lsa=LSA_BLOCK if groups > 4 * LSA_BLOCK else None)


def learn_group_permutation(weights, stats, init_perm: torch.Tensor, plan: PruningPlan, loss_fn=None, norms=None):
    """Learn one group's permutation from `init_perm` with the plan's learning settings (the `layer` scope's
    learner), metric and budget; `loss_fn` None is the exact `layer` objective, `norms` the score's per-input
    factor (computed from `stats` when not given). Returns (perm, {"init_loss", "learned_loss"})."""
    from ..algorithms.learned import block_size_for, learn_permutation

    learning = plan.learning
    settings = replace(learning, block_size=block_size_for(weights[0].shape[1], learning.block_size, plan.pattern.m))
    norms = score_norms(stats, plan) if norms is None else norms
    with torch.enable_grad():  # the pruning pass runs under no_grad; learning needs gradients
        result = learn_permutation(weights, stats.gram(), norms, plan.pattern.n, plan.pattern.m, settings,
                                   metric=plan.permutation_metric, init_perm=init_perm, loss_fn=loss_fn)
    return result.perm, {"init_loss": result.init_loss, "learned_loss": result.best_loss}


def score_norms(stats: InputStatistics, plan: PruningPlan) -> torch.Tensor | None:
    """The per-input factor of the scores that choose the permutation: none for magnitude, the OBS weights
    for lsq (whose refit is the compensation they assume; on the plan's damp, as SparseGPT's), the feature
    norms ||x_j|| otherwise."""
    if plan.permutation_metric == "magnitude":
        return None
    if plan.metric == "lsq":
        return obs_feature_weights(DampedGram.from_gram(stats.gram(), plan.damp))
    return stats.feature_norms()


def _prune_members(weights, dense, scores, stats, perm, plan: PruningPlan, info: dict, timed):
    """Prune each member in permuted order: by its scores, by SparseGPT with a weight update, or by the
    scores' mask improved on the exact output error (metric "gram"); metric "lsq" is `_prune_lsq`."""
    if plan.metric == "lsq":
        return _prune_lsq(weights, dense, scores, stats, perm, plan, info, timed)
    n, m = plan.pattern.n, plan.pattern.m
    pruned, masks, row = {}, {}, 0
    hessian = stats.hessian() if plan.metric == "sparsegpt" else None
    gram = stats.gram()[perm][:, perm] if plan.metric == "gram" else None
    for name, w in dense.items():
        rows, wp = w.shape[0], w[:, perm]
        if plan.metric == "sparsegpt":
            with timed("sparsegpt"):
                new, mask = sparsegpt_prune(w, hessian, n, m, perm=perm, damp=plan.damp)
        else:
            mask = nm_mask(scores[row:row + rows][:, perm], n, m)
            if gram is not None:
                with timed("gram_mask"):
                    mask = gram_mask(wp, gram, mask, n, m)
            new = wp.masked_fill(~mask, 0)
        pruned[name], masks[name] = new.to(weights[name].dtype), mask
        row += rows
    return pruned, masks


def _prune_lsq(weights, dense, scores, stats, perm, plan: PruningPlan, info: dict, timed):
    """Per member two candidate masks, SparseGPT's (with its update) and the Gram-chosen one; the refit's
    dampening estimated from SparseGPT's updates of the whole group (`evidence_damp`); then every row
    refitted on both and the better kept. SparseGPT's candidate starts from its own update."""
    n, m = plan.pattern.n, plan.pattern.m
    hessian, gram = stats.hessian(), stats.gram()[perm][:, perm]
    candidates, row = {}, 0
    for name, w in dense.items():
        rows, wp = w.shape[0], w[:, perm]
        with timed("sparsegpt"):
            updated, sparsegpt_mask = sparsegpt_prune(w, hessian, n, m, perm=perm, damp=plan.damp)
        with timed("gram_mask"):
            chosen = gram_mask(wp, gram, nm_mask(scores[row:row + rows][:, perm], n, m), n, m)
        candidates[name] = (wp, updated.float(), sparsegpt_mask, chosen)
        row += rows
    with timed("gram_inverse"):
        parts = list(zip(*candidates.values()))
        damp = max(plan.damp, evidence_damp(parts[0], parts[1], parts[2], gram, stats.num_tokens))
        system = DampedGram.from_gram(gram, damp)
    pruned, masks = {}, {}
    for name, (wp, updated, sparsegpt_mask, chosen) in candidates.items():
        with timed("refit"):
            new, mask, fits = refit_best_of(wp, system, [sparsegpt_mask, chosen], starts=[updated, None])
        _record_refit(info, name, fits)
        pruned[name], masks[name] = new.to(weights[name].dtype), mask
    info["damp"] = damp
    return pruned, masks


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


def _record_refit(info: dict, name: str, fits) -> None:
    """Per linear and candidate mask: the refit's iterations (largest, mean) and rows stopped at the cap."""
    info.setdefault("refit", {})[name] = [
        {"iterations_max": int(fit.iterations.max()), "iterations_mean": round(float(fit.iterations.float().mean()), 2),
         "unconverged_rows": int((~fit.converged).sum())} for fit in fits]
