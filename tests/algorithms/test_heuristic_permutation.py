"""Heuristic channel permutation: bijection, never worse than the identity, brute-force references."""

import itertools

import pytest
import torch

from optimum_permllm.algorithms import heuristic_permutation, quantile_deal, retained_score
from optimum_permllm.sparse import check_permutation


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _brute_force_retained(scores, perm, n, m):
    """Loop definition: for every row and every group of m permuted columns, add the n largest."""
    total = 0.0
    for row in scores.tolist():
        permuted = [row[c] for c in perm.tolist()]
        for start in range(0, len(permuted), m):
            total += sum(sorted(permuted[start : start + m], reverse=True)[:n])
    return total


def _group_of(perm, channel, m):
    return int((perm == channel).nonzero()) // m


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_retained_score_matches_brute_force(n, m):
    scores = torch.rand(3, 16, generator=_generator(0))
    perm = torch.randperm(16, generator=_generator(1))
    assert retained_score(scores, perm, n, m) == pytest.approx(_brute_force_retained(scores, perm, n, m), rel=1e-6)


@pytest.mark.parametrize("seed,shape,n,m", [(0, (16, 64), 2, 4), (1, (7, 48), 1, 4), (2, (40, 32), 4, 8), (3, (1, 24), 2, 4)])
def test_random_scores_bijection_and_improvement(seed, shape, n, m):
    scores = torch.rand(*shape, generator=_generator(seed)) * torch.rand(1, shape[1], generator=_generator(seed + 10))
    perm = heuristic_permutation(scores, n, m)
    check_permutation(perm, shape[1])
    assert perm.dtype == torch.long
    identity = retained_score(scores, torch.arange(shape[1]), n, m)
    assert retained_score(scores, perm, n, m) > identity


def test_lsa_improves_on_quantile_dealing():
    scores = torch.rand(32, 96, generator=_generator(4)) ** 3
    dealt = retained_score(scores, quantile_deal(scores, 4), 2, 4)
    assert retained_score(scores, heuristic_permutation(scores, 2, 4), 2, 4) > dealt


def test_blocked_lsa_is_a_valid_improving_permutation():
    scores = torch.rand(32, 96, generator=_generator(4)) ** 3
    dealt = retained_score(scores, quantile_deal(scores, 4), 2, 4)
    perm = heuristic_permutation(scores, 2, 4, max_groups_per_lsa=5)
    check_permutation(perm, 96)
    assert retained_score(scores, perm, 2, 4) > dealt


def test_converged_result_has_no_improving_same_slot_swap():
    """After convergence each slot's LSA is optimal, so no swap of two groups' same-slot channels helps."""
    n, m = 2, 4
    scores = torch.rand(5, 24, generator=_generator(5))
    perm = heuristic_permutation(scores, n, m, lsa_rounds=50)
    best = retained_score(scores, perm, n, m)
    for slot in range(m):
        for a, b in itertools.combinations(range(24 // m), 2):
            swapped = perm.clone()
            swapped[[a * m + slot, b * m + slot]] = perm[[b * m + slot, a * m + slot]]
            assert retained_score(scores, swapped, n, m) <= best + 1e-9


def test_never_worse_when_identity_is_already_optimal():
    """Every group already has at most n non-zero scores per row: the identity keeps everything."""
    n, m, out, width = 2, 4, 12, 32
    keep = torch.rand(out, width // m, m, generator=_generator(6)).argsort(-1)[..., :n]
    scores = torch.zeros(out, width // m, m).scatter_(-1, keep, 1.0 + torch.rand(out, width // m, n, generator=_generator(7)))
    scores = scores.reshape(out, width)
    identity = retained_score(scores, torch.arange(width), n, m)
    assert identity == pytest.approx(float(scores.sum(dtype=torch.float64)))
    for rounds in (0, 1):
        assert retained_score(scores, heuristic_permutation(scores, n, m, lsa_rounds=rounds), n, m) >= identity


@pytest.mark.parametrize("scores", [torch.ones(4, 16), torch.zeros(3, 16)])
def test_degenerate_scores_give_a_valid_permutation(scores):
    perm = heuristic_permutation(scores, 2, 4)
    check_permutation(perm, 16)
    assert retained_score(scores, perm, 2, 4) >= retained_score(scores, torch.arange(16), 2, 4)


def test_separates_big_channels_that_the_identity_groups_together():
    row = torch.tensor([[10.0, 9.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    perm = heuristic_permutation(row, 1, 4)
    assert _group_of(perm, 0, 4) != _group_of(perm, 1, 4)
    assert retained_score(row, perm, 1, 4) == pytest.approx(19.0)

    scores = torch.full((6, 16), 0.1)
    scores[:, :3] = 5.0  # three important channels in the identity's first 2:4 group: one is lost
    perm = heuristic_permutation(scores, 2, 4)
    groups = [_group_of(perm, channel, 4) for channel in range(3)]
    assert max(groups.count(g) for g in groups) <= 2
    assert retained_score(scores, perm, 2, 4) == pytest.approx(6 * (3 * 5.0 + 5 * 0.1))


def test_single_group_returns_identity():
    assert torch.equal(heuristic_permutation(torch.rand(3, 4), 2, 4), torch.arange(4))


def test_quantile_deal_gives_each_group_one_channel_per_quantile():
    scores = torch.arange(12.0).flip(0).unsqueeze(0)  # channel c has summed score 11 - c
    groups = quantile_deal(scores, 4).reshape(3, 4)
    rank = 11 - groups  # ascending rank of each channel
    assert torch.equal(rank // 3, torch.arange(4).expand(3, 4))
    assert torch.equal(rank[:, 0], torch.tensor([0, 1, 2])) and torch.equal(rank[:, 1], torch.tensor([5, 4, 3]))


def test_clear_errors():
    with pytest.raises(ValueError, match="not divisible"):
        heuristic_permutation(torch.rand(2, 6), 2, 4)
    with pytest.raises(ValueError, match="NaN"):
        heuristic_permutation(torch.full((2, 8), float("nan")), 2, 4)
    with pytest.raises(ValueError, match="max_groups_per_lsa"):
        heuristic_permutation(torch.rand(2, 8), 2, 4, max_groups_per_lsa=1)
    with pytest.raises(ValueError, match="2-D"):
        heuristic_permutation(torch.rand(8), 2, 4)


def test_head_shared_permutation_keeps_heads_and_beats_the_identity():
    from optimum_permllm.algorithms.heuristic_permutation import head_shared_permutation
    from optimum_permllm.sparse.permutation import head_shared_blocks

    scores = torch.rand(16, 4 * 16, generator=_generator(2)).pow(3)  # 4 query heads of 16, 2 KV heads
    perm = head_shared_permutation(scores, 4, 2, 2, 4)
    blocks = head_shared_blocks(perm, 4, 2)
    assert blocks is not None
    identity = torch.arange(64)
    assert retained_score(scores, perm, 2, 4) > retained_score(scores, identity, 2, 4)
    # the stacked sub-problem of KV head 0 (query heads 0 and 1) scores what the full layer scores there
    stacked = torch.cat([scores[:, :16], scores[:, 16:32]])
    half = retained_score(stacked, blocks[0], 2, 4)
    assert half == pytest.approx(retained_score(scores[:, :32], perm[:32], 2, 4))


def test_head_shared_permutation_of_one_head_is_the_plain_heuristic():
    from optimum_permllm.algorithms.heuristic_permutation import head_shared_permutation

    scores = torch.rand(8, 32, generator=_generator(3))
    assert torch.equal(head_shared_permutation(scores, 1, 1, 2, 4), heuristic_permutation(scores, 2, 4))


def test_head_shared_permutation_rejects_heads_that_do_not_fit():
    from optimum_permllm.algorithms.heuristic_permutation import head_shared_permutation

    with pytest.raises(ValueError, match="head"):
        head_shared_permutation(torch.rand(4, 24), 4, 2, 2, 4)  # heads of 6 channels: not a multiple of M
