"""Channel permutations against their definition: x @ W.T == x[:, p] @ W[:, p].T."""

import pytest
import torch

from optimum_permllm.sparse import check_permutation, compose, identity_permutation, invert_permutation, is_identity


def test_permuting_inputs_and_columns_together_leaves_the_product_unchanged():
    x, weight, perm = torch.randn(5, 16), torch.randn(8, 16), torch.randperm(16)
    torch.testing.assert_close(x[:, perm] @ weight[:, perm].T, x @ weight.T)


def test_inverse_undoes_the_permutation():
    perm = torch.randperm(32)
    inv = invert_permutation(perm)
    assert torch.equal(perm[inv], torch.arange(32))
    assert torch.equal(inv[perm], torch.arange(32))


def test_compose_equals_indexing_twice():
    x, a, b = torch.randn(10), torch.randperm(10), torch.randperm(10)
    assert torch.equal(x[a][b], x[compose(a, b)])


def test_identity_detection():
    assert is_identity(identity_permutation(7))
    assert not is_identity(torch.tensor([1, 0, 2]))


@pytest.mark.parametrize("bad", [torch.tensor([0, 0, 1]), torch.tensor([0, 1, 3]), torch.tensor([[0, 1]]), torch.tensor([0.0, 1.0])])
def test_non_bijections_are_rejected(bad):
    with pytest.raises(ValueError):
        check_permutation(bad, bad.numel())


def test_wrong_length_is_rejected():
    with pytest.raises(ValueError, match="input channels"):
        check_permutation(torch.arange(4), 8)
