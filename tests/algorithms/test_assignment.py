"""batched_assignment: optimal against brute force, convention of the output, thread pool path."""

import itertools

import pytest
import torch

from optimum_permllm.algorithms.assignment import assignment_matrix, batched_assignment


def brute_force_best(block: torch.Tensor, maximize: bool) -> float:
    """Best total over all k! assignments of a [k, k] block."""
    k = block.shape[0]
    totals = [float(block[torch.arange(k), torch.tensor(p)].sum()) for p in itertools.permutations(range(k))]
    return max(totals) if maximize else min(totals)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("maximize", [True, False])
def test_optimal_against_brute_force(k, maximize):
    score = torch.randn(6, k, k, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    perms = batched_assignment(score, maximize=maximize)
    assert perms.shape == (6, k) and perms.dtype == torch.long
    for block, perm in zip(score, perms):
        assert sorted(perm.tolist()) == list(range(k))
        total = float(block[torch.arange(k), perm].sum())
        assert total == pytest.approx(brute_force_best(block, maximize), abs=1e-12)


def test_recovers_a_planted_permutation_and_matrix_convention():
    perms = torch.stack([torch.randperm(7, generator=torch.Generator().manual_seed(s)) for s in range(3)])
    score = assignment_matrix(perms) + 0.01 * torch.rand(3, 7, 7, generator=torch.Generator().manual_seed(9))
    assert torch.equal(batched_assignment(score), perms)
    matrix = assignment_matrix(perms)
    assert torch.equal(matrix[1, torch.arange(7), perms[1]], torch.ones(7))
    assert torch.equal(matrix.sum(-1), torch.ones(3, 7)) and torch.equal(matrix.sum(-2), torch.ones(3, 7))


def test_thread_pool_gives_the_same_answer():
    score = torch.randn(40, 16, 16, generator=torch.Generator().manual_seed(5))
    assert torch.equal(batched_assignment(score, workers=4), batched_assignment(score, workers=1))


def test_float32_and_gradients_are_accepted():
    score = torch.randn(2, 3, 3, requires_grad=True)
    assert batched_assignment(score).shape == (2, 3)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="square"):
        batched_assignment(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="NaN"):
        batched_assignment(torch.full((1, 2, 2), float("nan")))
