"""PermutedSparseLinear against the dense masked reference."""

import pytest
import torch
from torch import nn

from optimum_permllm.nn import PermutedSparseLinear
from optimum_permllm.sparse import check_nm, invert_permutation, nm_mask


def _reference(linear, perm, n, m):
    """The dense masked layer: W[:, perm] pruned to N:M by magnitude, applied to x[:, perm]."""
    permuted = linear.weight.detach()[:, perm]
    pruned = permuted.masked_fill(~nm_mask(permuted.abs(), n, m), 0)
    return lambda x: x[..., perm] @ pruned.T + (0 if linear.bias is None else linear.bias.detach())


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_the_dense_masked_reference(n, m, bias):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=bias)
    perm = torch.randperm(64)
    layer = PermutedSparseLinear.from_linear(linear, n, m, perm=perm)
    x = torch.randn(3, 7, 64)
    torch.testing.assert_close(layer(x), _reference(linear, perm, n, m)(x), rtol=1e-5, atol=1e-5)


def test_stored_pattern_holds_in_permuted_order_and_not_necessarily_in_original_order():
    torch.manual_seed(1)
    linear = nn.Linear(64, 32)
    perm = torch.randperm(64)
    layer = PermutedSparseLinear.from_linear(linear, 2, 4, perm=perm)
    assert check_nm(layer.permuted_dense_weight(), 2, 4)
    assert torch.equal(layer.dense_weight(), layer.permuted_dense_weight()[:, invert_permutation(perm)])


def test_to_linear_is_the_unpermuted_equivalent():
    torch.manual_seed(2)
    linear = nn.Linear(32, 16)
    layer = PermutedSparseLinear.from_linear(linear, 2, 4, perm=torch.randperm(32))
    dense = layer.to_linear()
    x = torch.randn(4, 32)
    torch.testing.assert_close(dense(x), layer(x), rtol=1e-5, atol=1e-6)
    # Every kept weight is the original weight, every other one is exactly zero.
    kept = dense.weight != 0
    assert torch.equal(dense.weight[kept], linear.weight.detach()[kept])
    assert int(kept.sum()) == 32 * 16 // 2


def test_explicit_weight_and_mask_are_stored_as_given():
    linear = nn.Linear(8, 2, bias=False)
    weight = torch.arange(16.0).reshape(2, 8)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    layer = PermutedSparseLinear.from_linear(linear, 2, 4, mask=mask, weight=weight)
    assert torch.equal(layer.permuted_dense_weight(), weight.masked_fill(~mask, 0))
    assert torch.equal(layer.permuted_mask(), mask)


def test_state_dict_holds_only_the_portable_form():
    layer = PermutedSparseLinear.from_linear(nn.Linear(64, 16), 2, 4)
    state = layer.state_dict()
    assert set(state) == {"weight", "weight_mask", "input_perm", "bias"}
    assert state["weight"].shape == (16, 32) and state["weight_mask"].dtype == torch.uint8


def test_load_state_dict_refreshes_the_identity_flag():
    source = PermutedSparseLinear.from_linear(nn.Linear(16, 8), 2, 4, perm=torch.randperm(16))
    target = PermutedSparseLinear(16, 8, 2, 4)
    assert target.has_identity_perm()
    target.load_state_dict(source.state_dict())
    x = torch.randn(2, 16)
    assert torch.equal(target(x), source(x))
    assert "permuted" in repr(target)


def test_repr_is_readable():
    text = repr(PermutedSparseLinear.from_linear(nn.Linear(16, 8), 2, 4))
    assert "in_features=16" in text and "sparsity=2:4" in text and "input_perm=identity" in text


def test_half_precision_forward_on_cpu():
    linear = nn.Linear(32, 16).to(torch.bfloat16)
    layer = PermutedSparseLinear.from_linear(linear, 2, 4)
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    torch.testing.assert_close(layer(x), layer.to_linear()(x))


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="not divisible by M=4"):
        PermutedSparseLinear(30, 8, 2, 4)
    with pytest.raises(ValueError, match="0 < N < M"):
        PermutedSparseLinear(32, 8, 4, 4)
    with pytest.raises(ValueError, match="bijection|input channels"):
        PermutedSparseLinear.from_linear(nn.Linear(8, 4), 2, 4, perm=torch.tensor([0, 0, 1, 2, 3, 4, 5, 6]))


def test_permute_output_rows_reorders_the_outputs_after_a_cached_forward():
    torch.manual_seed(5)
    layer = PermutedSparseLinear.from_linear(nn.Linear(32, 12), 2, 4, perm=torch.randperm(32))
    x = torch.randn(4, 32)
    before = layer(x)  # fills the cached dense weight, which the mutator must drop
    rows = torch.randperm(12)
    layer.permute_output_rows(rows)
    assert torch.equal(layer(x), before[:, rows])
    assert check_nm(layer.permuted_dense_weight(), 2, 4)


def test_set_input_perm_changes_the_read_order_and_nothing_else():
    torch.manual_seed(6)
    layer = PermutedSparseLinear.from_linear(nn.Linear(32, 12), 2, 4, perm=torch.randperm(32))
    x = torch.randn(4, 32)
    layer(x)
    permuted_weight = layer.permuted_dense_weight().clone()
    new = torch.randperm(32)
    layer.set_input_perm(new)
    torch.testing.assert_close(layer(x), x[:, new] @ permuted_weight.T + layer.bias, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        layer.set_input_perm(torch.zeros(32, dtype=torch.long))


def test_gpu_weight_cache_is_rebuilt_when_only_the_mask_changes(monkeypatch):
    """The semi-structured weight is cached per module; a mask edited in place (same packed values, other
    kept positions) must rebuild it, or the kernel keeps computing with the old positions. The CUDA
    support check and compression are stood in for, so the cache logic runs on the CPU."""
    from optimum_permllm.nn import cuda_sparse
    from optimum_permllm.sparse.nm import pack_bits

    built = []
    monkeypatch.setattr(cuda_sparse, "semi_structured_support", lambda *args: None)
    monkeypatch.setattr(cuda_sparse, "compress_weight", lambda dense: built.append(dense.clone()) or built[-1])
    torch.manual_seed(7)
    layer = PermutedSparseLinear.from_linear(nn.Linear(16, 4), 2, 4, perm=torch.randperm(16))
    first = layer._cuda_weight()
    assert torch.equal(first, layer.permuted_dense_weight()) and layer._cuda_weight() is first  # cached
    mirrored = layer.permuted_mask().reshape(4, 4, 4).flip(-1).reshape(4, 16)  # still 2 of every 4
    with torch.no_grad():
        layer.weight_mask.copy_(pack_bits(mirrored))
    rebuilt = layer._cuda_weight()
    assert len(built) == 2 and torch.equal(rebuilt, layer.permuted_dense_weight())
    assert torch.equal(rebuilt != 0, mirrored) and not torch.equal(rebuilt, first)
