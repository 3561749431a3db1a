"""The metric table: one entry per metric, read by the plan and the planner; each group scored once."""

import torch

from optimum_permllm import PermLLMConfig, options
from optimum_permllm.algorithms import heuristic_permutation, ria_scores
from optimum_permllm.algorithms.refit import DampedGram
from optimum_permllm.pipeline import metrics
from optimum_permllm.pipeline.metrics import METRICS, Metric, feature_norms, prune_by_score
from optimum_permllm.pipeline.plan import PruningPlan
from optimum_permllm.pipeline.planning import plan_group
from optimum_permllm.sparse import NMPattern

from .test_layerwise import _random_group


def test_the_table_describes_exactly_the_metrics_a_user_can_choose():
    assert tuple(METRICS) == options.METRICS


def test_a_new_metric_is_one_entry(monkeypatch):
    """An entry alone decides the plan's statistics and calibration, the score the permutation is chosen
    on, and how the group is pruned."""
    calls = []

    def prune(dense, scores, stats, perm, pattern, damp, info, timed):
        calls.append(scores)
        return prune_by_score(dense, scores, stats, perm, pattern, damp, info, timed)

    monkeypatch.setitem(METRICS, "ria-gram", Metric("ria", feature_norms, prune, needs_gram=True))
    monkeypatch.setitem(METRICS, "data-free", Metric("magnitude", lambda stats, damp: None, prune, calibrated=False))
    plan = PruningPlan(NMPattern(2, 4), metric="ria-gram", permutation="heuristic")
    assert plan.needs_gram and plan.needs_calibration
    free = PruningPlan(NMPattern(2, 4), metric="data-free", permutation="none")
    assert not free.needs_gram and not free.needs_calibration

    weights, stats, _ = _random_group(seed=1)
    group_plan = plan_group(weights, stats, plan)
    scores = torch.cat([ria_scores(w, stats.feature_norms()) for w in weights.values()])
    assert torch.equal(calls[0], scores)
    assert torch.equal(group_plan.perm, heuristic_permutation(scores, 2, 4))
    for name, w in weights.items():
        assert torch.equal(group_plan.weights[name], w[:, group_plan.perm].masked_fill(~group_plan.masks[name], 0))

    assert torch.equal(plan_group(weights, None, free).weights["a"], plan_group(
        weights, stats, PermLLMConfig(metric="magnitude", permutation="none").to_plan()).weights["a"])


def test_the_learned_permutation_reuses_the_groups_scores(monkeypatch):
    """lsq's OBS weights (a Cholesky of the Gram matrix) are computed once per group, and the learner ranks
    with the very weights the heuristic start used."""
    import optimum_permllm.algorithms.learned as learned

    weights, stats, _ = _random_group(seed=2)
    gram = stats.gram()
    inverses, seen = [], []
    real_from_gram, real_learn = DampedGram.from_gram.__func__, learned.learn_permutation

    def counting_from_gram(cls, matrix, damp):
        if torch.equal(matrix, gram):  # the unpermuted Gram: the scores' OBS weights (the refit's is permuted)
            inverses.append(damp)
        return real_from_gram(cls, matrix, damp)

    monkeypatch.setattr(DampedGram, "from_gram", classmethod(counting_from_gram))
    monkeypatch.setattr(learned, "learn_permutation", lambda *a, **k: seen.append(a[2]) or real_learn(*a, **k))
    plan_group(weights, stats, PermLLMConfig(metric="lsq", permutation="learned", steps=2).to_plan())
    assert inverses == [0.01]
    expected = metrics.obs_weights(stats, 0.01)
    assert len(seen) == 1 and torch.equal(seen[0], expected)
