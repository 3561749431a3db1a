"""N:M masks, pattern checks and packing, against their definitions."""

import itertools

import pytest
import torch

from optimum_permllm.sparse import NMPattern, check_nm, nm_mask, nm_violations, pack_nm, packed_nbytes, unpack_nm

PATTERNS = [(2, 4), (1, 4), (4, 8), (3, 8), (1, 2)]


def test_hand_computed_2_4():
    weight = torch.arange(1.0, 9.0).reshape(1, 8)
    kept = weight.masked_fill(~nm_mask(weight, 2, 4), 0)
    assert kept.tolist() == [[0, 0, 3, 4, 0, 0, 7, 8]]


@pytest.mark.parametrize("n,m", PATTERNS)
def test_mask_keeps_the_top_n_of_every_group(n, m):
    scores = torch.randn(16, 4 * m, generator=torch.Generator().manual_seed(m))
    mask = nm_mask(scores, n, m)
    groups, kept = scores.reshape(16, -1, m), mask.reshape(16, -1, m)
    assert bool((kept.sum(-1) == n).all())
    # Every kept score is >= every dropped score of its group (the definition of top-n).
    low_kept = groups.masked_fill(~kept, float("inf")).min(-1).values
    high_dropped = groups.masked_fill(kept, float("-inf")).max(-1).values
    assert bool((low_kept >= high_dropped).all())


def test_ties_go_to_the_lower_position():
    assert nm_mask(torch.ones(1, 4), 2, 4).tolist() == [[True, True, False, False]]


def _nm_by_construction(rows, groups, n, m, generator):
    """A weight whose every group of m holds at most n non-zeros: a random 0..n of them, at random places."""
    ranks = torch.rand(rows, groups, m, generator=generator).argsort(-1).argsort(-1)  # a random order per group
    counts = torch.randint(0, n + 1, (rows, groups, 1), generator=generator)
    values = torch.randn(rows, groups, m, generator=generator)
    return values.masked_fill(ranks >= counts, 0).reshape(rows, groups * m)


def _brute_force_violations(weight, n, m):
    """Groups of m consecutive entries of a row with more than n non-zeros, counted one by one."""
    rows, cols = weight.shape
    return sum(int(sum(weight[r, g * m + j] != 0 for j in range(m)) > n) for r in range(rows) for g in range(cols // m))


@pytest.mark.parametrize("broken_groups", [0, 1, 3])
@pytest.mark.parametrize("n,m", PATTERNS)
def test_check_nm_matches_brute_force(n, m, broken_groups):
    generator = torch.Generator().manual_seed(10 * n + m)
    weight = _nm_by_construction(8, 4, n, m, generator)
    for index in torch.randperm(8 * 4, generator=generator)[:broken_groups].tolist():
        row, group = divmod(index, 4)  # give this group n + 1 non-zeros, at random places
        places = group * m + torch.randperm(m, generator=generator)[:n + 1]
        weight[row, places] = torch.rand(n + 1, generator=generator) + 0.5
    assert _brute_force_violations(weight, n, m) == broken_groups  # the construction did what it says
    assert int((weight.reshape(8, 4, m) != 0).sum(-1).eq(n).sum()) > broken_groups  # groups of exactly n remain
    assert check_nm(weight, n, m) == (broken_groups == 0)
    assert nm_violations(weight, n, m) == broken_groups


@pytest.mark.parametrize("dtype,int_view", [(torch.float32, torch.int32), (torch.float16, torch.int16), (torch.bfloat16, torch.int16)])
@pytest.mark.parametrize("n,m", PATTERNS)
def test_pack_round_trip_is_bit_exact(dtype, int_view, n, m):
    weight = torch.randn(32, 8 * m, generator=torch.Generator().manual_seed(m)).to(dtype)
    weight = weight.masked_fill(~nm_mask(weight.abs(), n, m), 0)
    values, bitmask = pack_nm(weight, n, m)
    assert values.shape == (32, 8 * n)
    assert torch.equal(unpack_nm(values, bitmask, 8 * m).view(int_view), weight.view(int_view))


def test_pack_keeps_explicit_zeros_when_the_mask_says_so():
    weight = torch.tensor([[0.0, 5.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False, False]])
    values, bitmask = pack_nm(weight, 2, 4, mask=mask)
    assert values.tolist() == [[0.0, 5.0]]
    assert torch.equal(unpack_nm(values, bitmask, 4), weight)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_2_4_packed_size_is_at_most_0_5625_of_dense(dtype):
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(0)).to(dtype)
    weight = weight.masked_fill(~nm_mask(weight.abs(), 2, 4), 0)
    values, bitmask = pack_nm(weight, 2, 4)
    assert packed_nbytes(values, bitmask) <= 0.5625 * weight.numel() * weight.element_size()


def test_bitmask_layout_is_little_endian_per_row():
    weight = torch.tensor([[1.0, 0, 0, 2, 0, 3, 4, 0]])
    _, bitmask = pack_nm(weight, 2, 4)
    assert bitmask.tolist() == [[0b01101001]]


@pytest.mark.parametrize("spec", ["4:4", "5:4", "0:4", "2-4", "a:b"])
def test_invalid_patterns_are_rejected_with_a_clear_error(spec):
    with pytest.raises(ValueError, match="N:M|0 < N < M"):
        NMPattern.parse(spec)


def test_width_not_divisible_by_m():
    with pytest.raises(ValueError, match="not divisible by M=4"):
        NMPattern(2, 4).check_width(10)
    with pytest.raises(ValueError, match="divisible"):
        nm_mask(torch.randn(2, 10), 2, 4)


def test_pack_refuses_a_weight_that_breaks_the_pattern():
    with pytest.raises(ValueError, match="more than 2 non-zeros"):
        pack_nm(torch.ones(2, 8), 2, 4)


def test_mask_is_exhaustive_on_all_4_element_orderings():
    for order in itertools.permutations(range(4)):
        scores = torch.tensor([list(order)], dtype=torch.float32)
        assert nm_mask(scores, 2, 4)[0].tolist() == [v >= 2 for v in order]
