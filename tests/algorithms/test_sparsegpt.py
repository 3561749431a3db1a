"""SparseGPT: exact N:M output, the weight update beats mask-only pruning, permuted order, errors."""

import pytest
import torch

from optimum_permllm.algorithms import InputStatistics, sparsegpt_prune, wanda_scores
from optimum_permllm.sparse import check_nm, nm_mask


@pytest.fixture
def layer():
    """A 24x64 weight and 512 correlated calibration tokens with their Hessian."""
    gen = torch.Generator().manual_seed(0)
    mixing = torch.randn(64, 64, generator=gen) / 8 + torch.eye(64)
    inputs = torch.randn(512, 64, generator=gen) @ mixing
    weight = torch.randn(24, 64, generator=gen)
    stats = InputStatistics(64, track_gram=True)
    stats.add_batch(inputs)
    return weight, inputs, stats


def _reconstruction_error(weight, pruned, inputs):
    """||(W - W') X^T||^2 on the calibration inputs."""
    return float(((weight - pruned.float()) @ inputs.T).square().sum())


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_output_is_exactly_nm(layer, n, m):
    weight, _, stats = layer
    pruned, mask = sparsegpt_prune(weight, stats.hessian(), n, m, block_size=16)
    assert mask.dtype == torch.bool
    assert bool((mask.reshape(24, -1, m).sum(-1) == n).all())
    assert check_nm(pruned, n, m)
    assert bool((pruned[~mask] == 0).all()) and not bool(torch.signbit(pruned[~mask]).any())


def test_weight_update_beats_mask_only_pruning(layer):
    weight, inputs, stats = layer
    pruned, _ = sparsegpt_prune(weight, stats.hessian(), 2, 4, block_size=16)
    magnitude = weight.masked_fill(~nm_mask(weight.abs(), 2, 4), 0)
    wanda = weight.masked_fill(~nm_mask(wanda_scores(weight, stats.feature_norms()), 2, 4), 0)
    error = _reconstruction_error(weight, pruned, inputs)
    assert error < 0.9 * _reconstruction_error(weight, magnitude, inputs)
    assert error < 0.9 * _reconstruction_error(weight, wanda, inputs)


def test_identity_hessian_reduces_to_magnitude_pruning():
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    pruned, mask = sparsegpt_prune(weight, torch.eye(16), 2, 4)
    expected = nm_mask(weight.abs(), 2, 4)
    assert torch.equal(mask, expected)
    torch.testing.assert_close(pruned, weight.masked_fill(~expected, 0))


def test_block_size_does_not_change_the_result(layer):
    weight, _, stats = layer
    small, small_mask = sparsegpt_prune(weight, stats.hessian(), 2, 4, block_size=8)
    large, large_mask = sparsegpt_prune(weight, stats.hessian(), 2, 4, block_size=128)
    assert torch.equal(small_mask, large_mask)
    torch.testing.assert_close(small, large, rtol=1e-4, atol=1e-4)


def test_permutation_is_applied_and_outputs_are_in_permuted_order(layer):
    weight, _, stats = layer
    hessian = stats.hessian()
    plain = sparsegpt_prune(weight, hessian, 2, 4)
    identity = sparsegpt_prune(weight, hessian, 2, 4, perm=torch.arange(64))
    assert torch.equal(plain[0], identity[0]) and torch.equal(plain[1], identity[1])
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(2))
    permuted = sparsegpt_prune(weight, hessian, 2, 4, perm=perm)
    reference = sparsegpt_prune(weight[:, perm], hessian[perm][:, perm], 2, 4)
    assert torch.equal(permuted[0], reference[0]) and torch.equal(permuted[1], reference[1])
    assert check_nm(permuted[0], 2, 4)


def test_dtype_and_inputs_are_preserved(layer):
    weight, _, stats = layer
    hessian = stats.hessian()
    weight16, hessian_copy = weight.to(torch.bfloat16), hessian.clone()
    pruned, _ = sparsegpt_prune(weight16, hessian, 2, 4)
    assert pruned.dtype == torch.bfloat16
    assert torch.equal(hessian, hessian_copy) and torch.equal(weight16, weight.to(torch.bfloat16))


def test_dead_features_are_zeroed_without_nan(layer):
    weight, inputs, _ = layer
    inputs = inputs.clone()
    inputs[:, [3, 10]] = 0
    stats = InputStatistics(64, track_gram=True)
    stats.add_batch(inputs)
    pruned, _ = sparsegpt_prune(weight, stats.hessian(), 2, 4)
    assert bool(torch.isfinite(pruned).all())
    assert bool((pruned[:, [3, 10]] == 0).all())
    assert check_nm(pruned, 2, 4)


def test_clear_errors():
    weight = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="more calibration samples.*damp"):
        sparsegpt_prune(weight, -torch.eye(8), 2, 4)
    with pytest.raises(ValueError, match="Hessian has shape"):
        sparsegpt_prune(weight, torch.eye(4), 2, 4)
    with pytest.raises(ValueError, match="multiple of M"):
        sparsegpt_prune(weight, torch.eye(8), 2, 4, block_size=6)
    with pytest.raises(ValueError, match="not divisible"):
        sparsegpt_prune(torch.randn(4, 6), torch.eye(6), 2, 4)
