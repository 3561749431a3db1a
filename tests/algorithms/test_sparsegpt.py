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
    # With an identity Hessian the update does nothing (ratio 1, the test below); on these correlated inputs it
    # measured 0.66 of magnitude's error and 0.70 of Wanda's (0.63-0.70 on seeds 0-3): 0.8 asks for the update
    # to remove at least a fifth of the error, with room for the seed.
    assert error < 0.8 * _reconstruction_error(weight, magnitude, inputs)
    assert error < 0.8 * _reconstruction_error(weight, wanda, inputs)


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
    with pytest.raises(RuntimeError, match=r"PermLLMConfig\(damp=0\.1\).*calibrate on more text"):
        sparsegpt_prune(weight, -torch.eye(8), 2, 4)
    with pytest.raises(ValueError, match="Hessian has shape"):
        sparsegpt_prune(weight, torch.eye(4), 2, 4)
    with pytest.raises(ValueError, match="multiple of M"):
        sparsegpt_prune(weight, torch.eye(8), 2, 4, block_size=6)
    with pytest.raises(ValueError, match="not divisible"):
        sparsegpt_prune(torch.randn(4, 6), torch.eye(6), 2, 4)


def fasterprune_reference(weight, hessian, prunen, prunem, blocksize=128, percdamp=0.01):
    """A direct port of the published SparseGPT `fasterprune` loop (N:M branch), written here as a reference.

    As in the paper's code, `prunen` is the number of weights PRUNED in every group of `prunem` columns
    (its "2:4" zeroes 2 of 4), the Hessian's dead features get 1 on the diagonal and zero weights, the
    damping is `percdamp` times the mean of the diagonal, and Hinv is the upper Cholesky factor of H^-1.
    """
    W = weight.clone().float()
    H = hessian.clone().float()
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    mask = torch.zeros_like(W, dtype=torch.bool)  # True = pruned, as in the published code
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        mask1 = torch.zeros_like(W1) == 1
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if i % prunem == 0:
                tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W, mask


@pytest.mark.parametrize("n,m,block_size", [(2, 4, 16), (4, 8, 24), (1, 4, 128)])
def test_matches_the_published_fasterprune_loop_on_random_data(n, m, block_size):
    """Same masks and pruned weights as the reference port, with several lazy blocks and a dead feature."""
    gen = torch.Generator().manual_seed(2)
    inputs = torch.randn(256, 96, generator=gen) @ (torch.randn(96, 96, generator=gen) / 6 + torch.eye(96))
    inputs[:, 5] = 0  # never active: a dead feature
    weight = torch.randn(40, 96, generator=gen)
    hessian = 2 * inputs.T @ inputs / inputs.shape[0]  # the paper's H = 2 X X^T / n
    pruned, kept = sparsegpt_prune(weight, hessian, n, m, block_size=block_size)
    expected, dropped = fasterprune_reference(weight, hessian, m - n, m, blocksize=block_size)
    assert torch.equal(kept, ~dropped)
    torch.testing.assert_close(pruned, expected, rtol=1e-5, atol=1e-5)
    assert bool((expected[:, 5] == 0).all()) and bool(dropped.any())


def test_permuted_pruning_is_the_published_loop_on_permuted_columns():
    gen = torch.Generator().manual_seed(3)
    inputs = torch.randn(256, 64, generator=gen) @ (torch.randn(64, 64, generator=gen) / 6 + torch.eye(64))
    weight, perm = torch.randn(16, 64, generator=gen), torch.randperm(64, generator=gen)
    hessian = inputs.T @ inputs
    pruned, kept = sparsegpt_prune(weight, hessian, 2, 4, perm=perm, block_size=32)
    expected, dropped = fasterprune_reference(weight[:, perm], hessian[perm][:, perm], 2, 4, blocksize=32)
    assert torch.equal(kept, ~dropped)
    torch.testing.assert_close(pruned, expected, rtol=1e-5, atol=1e-5)
