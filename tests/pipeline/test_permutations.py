"""The permutation table: one entry per choice, read by the plan, the planner and the layer engine."""

import logging
from contextlib import nullcontext

import pytest
import torch

from optimum_permllm import PermLLMConfig, options
from optimum_permllm.algorithms import heuristic_permutation, retained_score, wanda_scores
from optimum_permllm.pipeline.layerwise import sparsify_layerwise
from optimum_permllm.pipeline.metrics import METRICS, Metric, feature_norms, prune_by_score
from optimum_permllm.pipeline.permutations import PERMUTATIONS, Permutation, heuristic
from optimum_permllm.pipeline.plan import PruningPlan
from optimum_permllm.pipeline.planning import plan_group
from optimum_permllm.pipeline.preflight import warn_few_tokens, warn_unhelpful_learning
from optimum_permllm.sparse import NMPattern, identity_permutation
from optimum_permllm.sparse.permutation import head_shared_blocks

from ..conftest import tiny_model
from .test_layerwise import _ids, _random_group


def test_the_table_describes_exactly_the_permutations_a_user_can_choose():
    assert tuple(PERMUTATIONS) == options.PERMUTATIONS


def _reversed(scores, pattern, heads, learn, info, timed):
    """A permutation by definition: the columns in reverse order."""
    return torch.arange(scores.shape[1] - 1, -1, -1)


def test_a_new_permutation_is_one_entry(monkeypatch):
    """An entry alone decides the permutation the planner prunes in and what the plan reads."""
    monkeypatch.setitem(PERMUTATIONS, "reversed", Permutation(_reversed, calibrated=False))
    plan = PruningPlan(NMPattern(2, 4), metric="magnitude", permutation="reversed")
    assert not plan.needs_calibration and not plan.needs_gram and not plan.learns
    weights, _, _ = _random_group(seed=3)
    group_plan = plan_group(weights, None, plan)
    width = weights["a"].shape[1]
    assert torch.equal(group_plan.perm, torch.arange(width - 1, -1, -1))
    for name, w in weights.items():  # each member pruned as magnitude does, in the reversed column order
        reversed_w = w.flip(1)
        expected_mask = (reversed_w.abs().reshape(w.shape[0], -1, 4).argsort(-1, descending=True).argsort(-1) < 2)
        assert torch.equal(group_plan.masks[name], expected_mask.reshape(w.shape))
        assert torch.equal(group_plan.weights[name], reversed_w.masked_fill(~group_plan.masks[name], 0))


def test_each_choice_gives_the_permutation_of_its_definition():
    weights, stats, _ = _random_group(seed=4)
    scores = torch.cat([wanda_scores(w, stats.feature_norms()) for w in weights.values()])
    expected = {"none": identity_permutation(scores.shape[1]), "heuristic": heuristic_permutation(scores, 2, 4)}
    for choice, perm in expected.items():
        group_plan = plan_group(weights, stats, PermLLMConfig(metric="wanda", permutation=choice).to_plan())
        assert torch.equal(group_plan.perm, perm), choice
    info = group_plan.info  # the heuristic's: what it keeps against the identity
    assert info["heuristic_score"] == retained_score(scores, expected["heuristic"], 2, 4) >= info["identity_score"]


def test_the_learned_choice_learns_from_the_heuristic_permutation_and_keeps_the_learners_answer():
    weights, stats, _ = _random_group(seed=5)
    scores = torch.cat([wanda_scores(w, stats.feature_norms()) for w in weights.values()])
    starts, answer = [], torch.randperm(scores.shape[1], generator=torch.Generator().manual_seed(0))

    def learn(dense, group_stats, init_perm, input_weights):
        starts.append(init_perm)
        assert group_stats is stats and torch.equal(input_weights, stats.feature_norms())
        return answer, {"init_loss": 2.0, "learned_loss": 1.0}

    plan = PermLLMConfig(metric="wanda", permutation="learned").to_plan()
    group_plan = plan_group(weights, stats, plan, learn=learn)
    assert len(starts) == 1 and torch.equal(starts[0], heuristic_permutation(scores, 2, 4))
    assert torch.equal(group_plan.perm, answer)
    assert group_plan.info["learned_loss"] == 1.0 and "learned_permutation" in group_plan.info["seconds"]
    assert plan.learns and plan.needs_gram and plan.needs_calibration


def test_heuristic_chooses_inside_heads_when_given_heads():
    weights, stats, _ = _random_group(seed=6, width=64)
    scores = torch.cat([wanda_scores(w, stats.feature_norms()) for w in weights.values()])
    perm = heuristic(scores, NMPattern(2, 4), (4, 2), None, {}, lambda part: nullcontext())
    assert head_shared_blocks(perm, 4, 2) is not None
    assert head_shared_blocks(heuristic(scores, NMPattern(2, 4), None, None, {}, lambda part: nullcontext()), 4, 2) is None


@pytest.mark.parametrize("inside_heads", [True, False])
def test_the_entry_says_whether_attention_outputs_are_chosen_inside_heads(inside_heads, monkeypatch):
    monkeypatch.setitem(PERMUTATIONS, "heuristic", Permutation(heuristic, inside_heads=inside_heads))
    monkeypatch.setattr("optimum_permllm.pipeline.folding.fold_layer_permutations", lambda *args, **kwargs: [])
    model = tiny_model("llama")  # 4 query heads, 2 KV heads
    sparsify_layerwise(model, _ids(), PermLLMConfig(fold_permutations="all").to_plan(), progress=False)
    o_proj = model.model.layers[0].self_attn.o_proj
    assert (head_shared_blocks(o_proj.input_perm, 4, 2) is not None) == inside_heads


def test_few_calibration_tokens_warn_for_a_metric_whose_entry_asks_for_more(monkeypatch, caplog):
    linears = {"wide": torch.nn.Linear(64, 8)}
    lsq = PermLLMConfig(metric="lsq").to_plan()
    with caplog.at_level(logging.WARNING, logger="optimum_permllm.pipeline.preflight"):
        warn_few_tokens(linears, lsq, tokens=4 * 64)  # FEW_TOKENS_PER_INPUT = 4 per input: enough
        warn_few_tokens(linears, PermLLMConfig(metric="sparsegpt").to_plan(), tokens=8)
        assert caplog.records == []
        warn_few_tokens(linears, lsq, tokens=4 * 64 - 1)
        monkeypatch.setitem(METRICS, "refit-8", Metric("wanda", feature_norms, prune_by_score, tokens_per_input=8))
        warn_few_tokens(linears, PruningPlan(NMPattern(2, 4), metric="refit-8"), tokens=8 * 64 - 1)
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith("lsq refits 32 kept weights") and "at least 256 tokens" in messages[0]
    assert messages[1].startswith("refit-8 refits") and "at least 512 tokens" in messages[1]


def test_learning_warns_where_it_measured_worse_than_its_heuristic_start_and_nowhere_else(caplog):
    """permutation='learned' measured worse on held-out text than its heuristic start with scope='layer' (any
    metric) and with scope='model' under a metric that replaces the trained score masks (gram, lsq; sparsegpt
    likewise); the joint training with the score metrics, and no learning, do not warn."""
    with caplog.at_level(logging.WARNING, logger="optimum_permllm.pipeline.preflight"):
        for config in (PermLLMConfig(), PermLLMConfig(permutation="learned", scope="model"),
                       PermLLMConfig(metric="ria", permutation="learned", scope="model"),
                       PermLLMConfig(metric="lsq"), PermLLMConfig(permutation="none")):
            warn_unhelpful_learning(config.to_plan())
        assert caplog.records == []
        warn_unhelpful_learning(PermLLMConfig(permutation="learned").to_plan())  # the layer scope is the default
        for metric in ("gram", "lsq", "sparsegpt"):
            warn_unhelpful_learning(PermLLMConfig(metric=metric, permutation="learned", scope="model").to_plan())
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 4
    assert "scope='layer'" in messages[0]
    for message, metric in zip(messages[1:], ("gram", "lsq", "sparsegpt")):
        assert "scope='model'" in message and f"metric='{metric}'" in message and f"heuristic' with {metric}" in message
