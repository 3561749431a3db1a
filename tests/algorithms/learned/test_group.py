"""Learned block permutations: conventions, straight-through values, the exact layer objective,
the membership gradient, best tracking, determinism, and a quality check against the heuristic."""

from dataclasses import replace

import pytest
import torch

from optimum_permllm.algorithms.assignment import assignment_matrix
from optimum_permllm.algorithms.heuristic_permutation import heuristic_permutation
from optimum_permllm.algorithms.learned import (
    BlockPermutation,
    LayerObjective,
    LearningSettings,
    learn_permutation,
    soft_nm_mask,
    straight_through,
)
from optimum_permllm.algorithms.learned import masks, parametrisation
from optimum_permllm.algorithms.sinkhorn import log_sinkhorn
from optimum_permllm.algorithms.scores import wanda_scores
from optimum_permllm.sparse.nm import check_nm, nm_mask
from optimum_permllm.sparse.permutation import check_permutation


pytestmark = pytest.mark.usefixtures("one_thread")


def make_group(channels=32, outs=(16, 8), seed=0, heavy=2, rank=None):
    """Random layers reading correlated inputs X = Z A with a few heavy channels (LLM outliers)."""
    g = torch.Generator().manual_seed(seed)
    tokens = 4 * channels
    rank = rank or channels
    x = torch.randn(tokens, rank, generator=g) @ torch.randn(rank, channels, generator=g)
    x = x + 0.3 * torch.randn(tokens, channels, generator=g)
    scale = torch.ones(channels)
    scale[torch.randperm(channels, generator=g)[:heavy]] = 20.0
    x = x * scale
    weights = [torch.randn(o, channels, generator=g) for o in outs]
    return weights, x, x.T @ x / tokens, x.norm(dim=0)


def pruned(weight, perm, norms, n=2, m=4):
    """Reference: Wanda N:M pruning of `weight` read in `perm` order, returned in original order."""
    mask = nm_mask(wanda_scores(weight, norms)[:, perm], n, m)
    out = torch.empty_like(weight)
    out[:, perm] = weight[:, perm].masked_fill(~mask, 0)
    return out


def token_loss(weights, x, perm, norms):
    """Summed output error over summed output energy, measured on the tokens (the swap search's loss)."""
    err = sum(((x @ w.T - x @ pruned(w, perm, norms).T) ** 2).sum() for w in weights)
    return float(err / sum(((x @ w.T) ** 2).sum() for w in weights))


def mean_token_loss(weights, x, perm, norms):
    """Mean over layers of each layer's relative output error, measured on the tokens (the layer objective)."""
    return sum(token_loss([w], x, perm, norms) for w in weights) / len(weights)


def test_layer_objective_equals_token_error():
    weights, x, gram, norms = make_group()
    weights[1] = weights[1] * 30  # very different output energies: each layer still counts the same
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(1))
    objective = LayerObjective(weights, gram)
    value = float(objective([pruned(w, perm, norms) for w in weights]))
    assert value == pytest.approx(mean_token_loss(weights, x, perm, norms), rel=1e-4)
    assert value != pytest.approx(token_loss(weights, x, perm, norms), rel=1e-2)
    assert float(objective(weights)) == 0.0


def test_learning_ignores_the_scale_of_each_layer():
    # q*c with k/c, or up*c with down/c, is the same model: the learned permutation must not change.
    weights, x, gram, norms = make_group(channels=64, outs=(48, 16), seed=4)
    init = heuristic_permutation(_group_scores(weights, norms), 2, 4)
    plain = learn_permutation(weights, gram, norms, 2, 4, LearningSettings(block_size=32, steps=3, refine_rounds=3), init_perm=init)
    scaled = [weights[0] * 8, weights[1] / 4]  # powers of two: the scaled arithmetic is exact
    again = learn_permutation(scaled, gram, norms, 2, 4, LearningSettings(block_size=32, steps=3, refine_rounds=3), init_perm=init)
    assert torch.equal(plain.perm, again.perm)
    assert again.best_loss == pytest.approx(plain.best_loss, rel=1e-5)


def test_block_size_must_divide_channels():
    with pytest.raises(ValueError, match="must divide"):
        BlockPermutation(48, block_size=32)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("init_bias", [0.0, 1.0])
def test_starts_exactly_at_init_perm(seed, init_bias):
    init = torch.randperm(64, generator=torch.Generator().manual_seed(seed))
    module = BlockPermutation(64, 16, init, torch.Generator().manual_seed(seed), init_bias=init_bias)
    assert torch.equal(module.hard(), init)
    perm, blocks = module(tau=1.0)
    assert torch.equal(perm, init)
    assert torch.equal(blocks, torch.eye(16).expand(4, 16, 16))  # straight-through forward is exactly hard


def test_block_convention_matches_package_perm():
    module = BlockPermutation(16, 8, torch.randperm(16, generator=torch.Generator().manual_seed(3)))
    slots = torch.stack([torch.randperm(8, generator=torch.Generator().manual_seed(s)) for s in (4, 5)])
    w = torch.randn(5, 16)
    permuted = parametrisation.from_blocks(torch.bmm(parametrisation.to_blocks(w[:, module.init_perm], 8), assignment_matrix(slots)))
    perm = module.perm_from_blocks(slots)
    check_permutation(perm, 16)
    assert torch.equal(permuted, w[:, perm])


def test_straight_through_gradient_goes_to_the_soft_blocks():
    module = BlockPermutation(16, 8, generator=torch.Generator().manual_seed(0))
    _, blocks = module(tau=0.5)
    target = torch.randn(2, 8, 8)
    (blocks * target).sum().backward()
    soft = module.soft(0.5).detach().requires_grad_(True)
    (soft * target).sum().backward()
    assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    # the weight gradient equals the soft path's gradient pulled back through the logits
    logits = module.logits().detach().requires_grad_(True)
    (log_sinkhorn(logits / 0.5, 5).exp() * target).sum().backward()
    torch.testing.assert_close(module.weight.grad, logits.grad * module.scale.detach())


def test_soft_nm_mask_is_hard_forward_softmax_backward():
    scores = torch.rand(3, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    mask = soft_nm_mask(scores, 2, 4)
    assert torch.equal(mask.bool(), nm_mask(scores.detach(), 2, 4))
    upstream = torch.randn(3, 8)
    (mask * upstream).sum().backward()
    reference = scores.detach().clone().requires_grad_(True)
    (2 * torch.softmax(reference.reshape(3, 2, 4), -1).reshape(3, 8) * upstream).sum().backward()
    torch.testing.assert_close(scores.grad, reference.grad)


def dense_membership_mask(blocks, scores, n, m, temperature):
    """Reference surrogate with plain autograd: mask[r, c] = sum_q Z[c, q] sigmoid((n - 1/2 - count) / t)."""
    size = blocks.shape[-1]
    group_of_slot = torch.zeros(size, size // m)
    group_of_slot[torch.arange(size), torch.arange(size) // m] = 1
    z = blocks @ group_of_slot  # [k, B, Q]
    higher = (scores.unsqueeze(-2) > scores.unsqueeze(-1)).float()  # [k, out, c, c']: c' scores above c
    count = torch.einsum("krcd,kdq->krcq", higher, z)
    keep = torch.sigmoid((n - 0.5 - count) / temperature)
    return torch.einsum("kcq,krcq->krc", z, keep)


def test_membership_mask_forward_and_gradient_against_dense_reference():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 5, 8, generator=g)
    slots = torch.stack([torch.randperm(8, generator=g) for _ in range(2)])
    blocks = assignment_matrix(slots).requires_grad_(True)
    order = torch.argsort(scores, dim=-1)
    mask = masks._MembershipMask.apply(blocks, slots, scores, order, 2, 4, 0.5)
    permuted = torch.bmm(scores, assignment_matrix(slots))
    expected = torch.bmm(nm_mask(permuted, 2, 4).float(), assignment_matrix(slots).transpose(1, 2))
    assert torch.equal(mask, expected)
    upstream = torch.randn(2, 5, 8, generator=g)
    (mask * upstream).sum().backward()
    reference_blocks = assignment_matrix(slots).requires_grad_(True)
    (dense_membership_mask(reference_blocks, scores, 2, 4, 0.5) * upstream).sum().backward()
    torch.testing.assert_close(blocks.grad, reference_blocks.grad)


@pytest.mark.parametrize("method", ["sinkhorn", "ot"])
def test_result_is_valid_exact_and_never_worse_than_init(method):
    weights, x, gram, norms = make_group(seed=2)
    init = torch.randperm(32, generator=torch.Generator().manual_seed(7))
    result = learn_permutation(weights, gram, norms, 2, 4, LearningSettings(learner=method, block_size=16, steps=8), init_perm=init)
    check_permutation(result.perm, 32)
    assert result.init_loss == pytest.approx(mean_token_loss(weights, x, init, norms), rel=1e-4)
    assert result.best_loss == pytest.approx(mean_token_loss(weights, x, result.perm, norms), rel=1e-4)
    assert result.best_loss <= result.init_loss and result.best_loss == min(result.history)
    assert len(result.history) == 10 and all(check_nm(pruned(w, result.perm, norms)[:, result.perm], 2, 4) for w in weights)


def test_deterministic_for_a_seed():
    weights, _, gram, norms = make_group(seed=3)
    first, second = (learn_permutation(weights, gram, norms, 2, 4, LearningSettings(block_size=16, steps=6, seed=5)) for _ in range(2))
    assert torch.equal(first.perm, second.perm) and first.history == second.history


def test_custom_loss_gets_pruned_weights_in_original_order_and_callback_can_stop():
    weights, _, gram, norms = make_group(seed=4)
    init = torch.randperm(32, generator=torch.Generator().manual_seed(8))
    seen = []

    def loss_fn(masked):
        seen.append([w.detach().clone() for w in masked])
        return sum((w - m).pow(2).sum() for w, m in zip(weights, masked))

    result = learn_permutation(weights, None, norms, 2, 4, LearningSettings(block_size=16, steps=20), init_perm=init,
                               loss_fn=loss_fn, callback=lambda step, loss, best: step == 2)
    for got, w in zip(seen[0], weights):
        assert torch.equal(got, pruned(w, init, norms))
    assert len(result.history) == 4  # steps 0, 1, 2, then the final hardened permutation


def test_a_scope_objective_is_searched_on_its_own_and_never_by_the_gram_swap_polish():
    # The scope here is the exact objective of OTHER inputs: the Gram matrix passed alongside must not steer it.
    weights, _, gram, norms = make_group(channels=64, outs=(48, 16), seed=4)
    _, _, other_gram, _ = make_group(channels=64, outs=(48, 16), seed=9)
    init = heuristic_permutation(_group_scores(weights, norms), 2, 4)
    settings = LearningSettings(block_size=32, refine_rounds=6, steps=0)
    # Without a scope, the polish lowers the Gram objective well below its initialisation ...
    polished = learn_permutation(weights, gram, norms, 2, 4, settings, init_perm=init)
    assert polished.best_loss < 0.9 * polished.init_loss  # measured 0.82 (0.82-0.88 on seeds 0-2, 4)
    # ... but under a scope that agrees with that objective, no step means no search: the init is kept.
    agreeing = learn_permutation(weights, gram, norms, 2, 4, settings, init_perm=init, loss_fn=LayerObjective(weights, gram))
    assert torch.equal(agreeing.perm, init) and agreeing.history == [agreeing.init_loss]
    # With learning steps, the result depends on the scope objective only, not on the Gram matrix passed.
    scope = LayerObjective(weights, other_gram)
    runs = [learn_permutation(weights, g, norms, 2, 4, replace(settings, steps=8), init_perm=init, loss_fn=scope)
            for g in (gram, other_gram)]
    assert torch.equal(runs[0].perm, runs[1].perm) and runs[0].history == runs[1].history
    assert runs[0].best_loss == pytest.approx(float(scope([pruned(w, runs[0].perm, norms) for w in weights])), rel=1e-5)


def test_quality_beats_identity_and_heuristic_on_correlated_inputs():
    weights, x, gram, norms = make_group(channels=128, outs=(128, 128), seed=0, heavy=8, rank=16)
    scores = torch.cat([wanda_scores(w, norms) for w in weights])
    init = heuristic_permutation(scores, 2, 4)
    identity_loss = mean_token_loss(weights, x, torch.arange(128), norms)
    result = learn_permutation(weights, gram, norms, 2, 4, LearningSettings(steps=40), init_perm=init)
    assert result.init_loss == pytest.approx(mean_token_loss(weights, x, init, norms), rel=1e-4)
    # Measured 0.87 of the better start here (0.86-0.87 on seeds 0-2), mostly from the swap polish (0.88 with no
    # Sinkhorn step, 0.98 with the Sinkhorn steps alone): 0.92 holds with room for the seed and fails if the
    # result gives back little more than the heuristic already has.
    assert result.best_loss < 0.92 * min(identity_loss, result.init_loss)
    assert result.best_loss == pytest.approx(mean_token_loss(weights, x, result.perm, norms), rel=1e-4)


def test_rejects_bad_arguments():
    weights, _, gram, norms = make_group()
    with pytest.raises(ValueError, match="learner='genetic' is not supported"):
        learn_permutation(weights, gram, norms, 2, 4, LearningSettings(learner="genetic", block_size=16))
    with pytest.raises(ValueError, match="multiple of M"):
        learn_permutation(weights, gram, norms, 2, 4, LearningSettings(block_size=2))
    with pytest.raises(ValueError, match="Gram"):
        learn_permutation(weights, None, norms, 2, 4, LearningSettings(block_size=16))
    with pytest.raises(ValueError, match="optimizer"):
        learn_permutation(weights, gram, norms, 2, 4, LearningSettings(block_size=16, optimizer="sgd"))


def test_straight_through_forward_is_bit_exact():
    hard = torch.tensor([1.0, 0.0, 1.0])
    soft = torch.tensor([0.3, 0.7, 0.1000001], requires_grad=True)
    assert torch.equal(straight_through(hard, soft), hard)


# ---- exact swap refinement (algorithms.swap_refinement) ----

from optimum_permllm.algorithms.swap_refinement import _State, _candidates, _gains, refine_swaps  # noqa: E402


def _group_scores(weights, norms):
    return torch.cat([wanda_scores(w, norms) for w in weights])


def test_predicted_swap_gains_equal_the_exact_loss_change():
    weights, x, gram, norms = make_group(channels=32, outs=(12, 5), seed=3)
    scores = _group_scores(weights, norms)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(1))
    state = _State(torch.cat(weights), gram, scores, perm, 2, 4)
    candidates = _candidates(32, 16, 4, "cpu")
    gains = _gains(state, candidates, None) / state.norm
    for k in range(0, gains.numel(), 7):
        i, j = (candidates[0][k] * 4 + candidates[1][k]).item(), (candidates[2][k] * 4 + candidates[3][k]).item()
        assert i // 16 == j // 16 and i // 4 != j // 4  # inside one block, between two N:M groups
        swapped = perm.clone()
        swapped[i], swapped[j] = perm[j], perm[i]
        assert gains[k].item() == pytest.approx(token_loss(weights, x, swapped, norms) - token_loss(weights, x, perm, norms), abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refinement_never_worsens_and_reports_the_exact_loss(seed):
    weights, x, gram, norms = make_group(channels=64, outs=(40, 24), seed=seed)
    init = heuristic_permutation(_group_scores(weights, norms), 2, 4)
    result = refine_swaps(weights, gram, _group_scores(weights, norms), init, 2, 4, block_size=32, rounds=6, screen_rows=16)
    check_permutation(result.perm, 64)
    assert result.loss == pytest.approx(token_loss(weights, x, result.perm, norms), rel=1e-4)
    assert all(b < a for a, b in zip(result.history, result.history[1:]))
    assert result.loss <= token_loss(weights, x, init, norms) + 1e-7
    blocks = lambda p: torch.stack([p[i : i + 32].sort().values for i in (0, 32)])  # noqa: E731
    assert torch.equal(blocks(result.perm), blocks(init))  # swaps never leave their block
    again = refine_swaps(weights, gram, _group_scores(weights, norms), init, 2, 4, block_size=32, rounds=6, screen_rows=16)
    assert torch.equal(result.perm, again.perm)


def _swapped(perm, i, j):
    out = perm.clone()
    out[i], out[j] = perm[j], perm[i]
    return out


def test_refinement_takes_the_brute_force_best_swap_and_stops_at_a_swap_local_optimum():
    # 8 channels in two 2:4 groups: all 16 swaps between the groups are enumerated by brute force.
    weights, x, gram, norms = make_group(channels=8, outs=(6,), seed=5, heavy=1)
    scores = _group_scores(weights, norms)
    identity = torch.arange(8)
    swaps = [(i, j) for i in range(4) for j in range(4, 8)]
    best_first = min(token_loss(weights, x, _swapped(identity, i, j), norms) for i, j in swaps)
    one_round = refine_swaps(weights, gram, scores, identity, 2, 4, block_size=8, rounds=1)
    assert one_round.loss == pytest.approx(min(best_first, token_loss(weights, x, identity, norms)), rel=1e-4)
    final = refine_swaps(weights, gram, scores, identity, 2, 4, block_size=8, rounds=20)
    assert all(token_loss(weights, x, _swapped(final.perm, i, j), norms) >= final.loss - 1e-7 for i, j in swaps)


def test_learned_permutation_with_refinement_beats_the_heuristic_init():
    weights, x, gram, norms = make_group(channels=64, outs=(48, 16), seed=4)
    init = heuristic_permutation(_group_scores(weights, norms), 2, 4)
    result = learn_permutation(weights, gram, norms, 2, 4, LearningSettings(block_size=32, steps=2, refine_rounds=6), init_perm=init)
    assert result.best_loss < 0.9 * result.init_loss  # measured 0.82 (0.82-0.88 on seeds 0-2, 4)
    assert result.best_loss == pytest.approx(mean_token_loss(weights, x, result.perm, norms), rel=1e-4)
