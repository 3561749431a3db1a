"""Pure checks of stored sparse tensors, against direct (unpacked, looped) references."""

import pytest
import torch

from optimum_permllm.sparse import nm_mask, pack_bits, pack_nm
from optimum_permllm.sparse.validation import (
    _every_group_keeps, group_counts, nm_mask_problem, non_finite_count, permutation_problem,
)

PATTERNS = [(1, 2), (2, 4), (3, 4), (4, 8), (2, 8), (8, 16), (16, 32), (32, 64), (3, 6)]


def _reference_counts(mask: torch.Tensor, m: int) -> torch.Tensor:
    return torch.tensor([[int(row[g:g + m].sum()) for g in range(0, row.numel(), m)] for row in mask])


WIDTHS = [64, 192, 12 * 8 + 4 * 6]


@pytest.mark.parametrize("n, m, cols", [(n, m, cols) for n, m in PATTERNS for cols in WIDTHS if cols % m == 0])
def test_group_counts_and_the_word_check_agree_with_a_loop_on_random_masks(n, m, cols):
    generator = torch.Generator().manual_seed(n * 100 + m + cols)
    for _ in range(5):
        mask = torch.rand(6, cols, generator=generator) < n / m
        bitmask = pack_bits(mask)
        reference = _reference_counts(mask, m)
        assert torch.equal(group_counts(bitmask, cols, m).long(), reference)
        assert _every_group_keeps(bitmask, cols, n, m) == bool((reference == n).all())
    valid = pack_bits(nm_mask(torch.rand(6, cols, generator=generator), n, m))
    assert _every_group_keeps(valid, cols, n, m)


def test_a_valid_packed_layer_has_no_problem():
    weight = torch.randn(8, 64)
    mask = nm_mask(weight.abs(), 2, 4)
    values, bitmask = pack_nm(weight * mask, 2, 4, mask=mask)
    assert nm_mask_problem(bitmask, values, 64, 2, 4) is None


def test_mask_problems_name_the_group_the_pattern_found_and_shape_mismatches():
    weight = torch.randn(8, 64)
    mask = nm_mask(weight.abs(), 4, 8)
    values, bitmask = pack_nm(weight * mask, 4, 8, mask=mask)
    problem = nm_mask_problem(bitmask, values, 64, 2, 4)
    counts = _reference_counts(mask, 4)
    row, group = (int(i) for i in (counts != 2).nonzero()[0])
    assert f"row {row}, group {group} keeps {int(counts[row, group])}" in problem and "the mask is 4:8" in problem
    assert "shape (8, 16), expected (8, 32)" in nm_mask_problem(bitmask, values[:, :16], 64, 2, 4)
    assert "expected torch.uint8 of shape (8, 8)" in nm_mask_problem(bitmask[:, :4], values, 64, 2, 4)


@pytest.mark.parametrize("perm, size, expected", [
    ([2, 0, 1, 3], 4, None),
    ([0, 1, 1, 3], 4, "channel 1 appears 2 times and 1 channels never appear"),
    ([0, 1, 2], 4, "has 3 entries, but the layer has 4 channels"),
    ([0, 1, 2, 4], 4, "outside [0, 4)"),
    ([0, -1, 2, 3], 4, "outside [0, 4)"),
])
def test_permutation_problems(perm, size, expected):
    problem = permutation_problem(torch.tensor(perm), size)
    assert problem == expected if expected is None else expected in problem


def test_a_float_permutation_is_a_problem():
    assert "not a 1-D integer permutation" in permutation_problem(torch.arange(4.0), 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_finite_count(dtype):
    values = torch.randn(4, 16).to(dtype)
    assert non_finite_count(values) == 0
    values[1, 2], values[3, 3] = float("nan"), float("-inf")
    assert non_finite_count(values) == 2
    huge = torch.full((4, 4), torch.finfo(dtype).max, dtype=dtype)  # a sum that overflows is not a problem
    assert non_finite_count(huge) == 0
