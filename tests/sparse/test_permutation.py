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


def _repeat_kv(values, num_heads, num_kv_heads):
    """transformers' repeat_kv on [num_kv_heads, head_dim, ...]: query head h reads KV head h // group."""
    return values.repeat_interleave(num_heads // num_kv_heads, dim=0)


def test_head_shared_permutation_folds_into_the_value_rows():
    """Permuting v_proj's rows by kv_rows_permutation permutes the (GQA) attention output by the full perm."""
    from optimum_permllm.sparse.permutation import expand_head_blocks, head_shared_blocks, kv_rows_permutation

    num_heads, num_kv_heads, head_dim = 6, 2, 4
    blocks = torch.stack([torch.randperm(head_dim, generator=torch.Generator().manual_seed(s)) for s in range(2)])
    perm = expand_head_blocks(blocks, num_heads)
    check_permutation(perm, num_heads * head_dim)
    assert torch.equal(head_shared_blocks(perm, num_heads, num_kv_heads), blocks)
    values = torch.randn(num_kv_heads * head_dim, 5)  # value rows (one column per token)
    attention_out = _repeat_kv(values.reshape(num_kv_heads, head_dim, 5), num_heads, num_kv_heads).reshape(-1, 5)
    folded = values[kv_rows_permutation(blocks)].reshape(num_kv_heads, head_dim, 5)
    assert torch.equal(_repeat_kv(folded, num_heads, num_kv_heads).reshape(-1, 5), attention_out[perm])


def test_permutations_that_cross_heads_or_differ_within_a_kv_group_are_not_head_shared():
    from optimum_permllm.sparse.permutation import head_shared_blocks

    crossing = torch.arange(8)
    crossing[[3, 4]] = crossing[[4, 3]]  # channel 3 of head 0 swaps with channel 0 of head 1
    assert head_shared_blocks(crossing, 2, 2) is None
    per_head = torch.tensor([1, 0, 2, 3, 4, 5, 6, 7])  # within heads, but query heads 0 and 1 share KV head 0
    assert head_shared_blocks(per_head, 2, 1) is None
    assert torch.equal(head_shared_blocks(per_head, 2, 2), torch.tensor([[1, 0, 2, 3], [0, 1, 2, 3]]))
