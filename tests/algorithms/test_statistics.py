"""InputStatistics: float32 sums, batch-size independence, merge, and the derived quantities."""

import pytest
import torch

from optimum_permllm.algorithms import InputStatistics


@pytest.fixture
def tokens():
    """40 random tokens of 6 features, as float64 for the reference."""
    return torch.randn(40, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_hand_computed_two_tokens():
    stats = InputStatistics(2, track_gram=True)
    stats.add_batch(torch.tensor([[1.0, 2.0], [3.0, 0.0]]))
    assert stats.num_tokens == 2
    torch.testing.assert_close(stats.feature_norms(), torch.tensor([10.0, 4.0]).sqrt())
    torch.testing.assert_close(stats.gram(), torch.tensor([[5.0, 1.0], [1.0, 2.0]]))
    torch.testing.assert_close(stats.hessian(), torch.tensor([[10.0, 2.0], [2.0, 4.0]]))


def test_matches_float64_reference(tokens):
    stats = InputStatistics(6, track_gram=True)
    stats.add_batch(tokens.reshape(4, 10, 6))
    torch.testing.assert_close(stats.feature_norms().double(), tokens.norm(dim=0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.hessian().double(), 2 / 40 * tokens.T @ tokens, rtol=1e-5, atol=1e-6)
    assert stats.sum_squares.dtype == torch.float32 and stats.gram_sum.dtype == torch.float32


def test_one_big_batch_equals_many_small_ones(tokens):
    whole = InputStatistics(6, track_gram=True)
    whole.add_batch(tokens)
    pieces = InputStatistics(6, track_gram=True)
    for chunk in tokens.split(7):
        pieces.add_batch(chunk)
    assert pieces.num_tokens == whole.num_tokens == 40
    torch.testing.assert_close(pieces.feature_norms(), whole.feature_norms())
    torch.testing.assert_close(pieces.hessian(), whole.hessian())


def test_merge_equals_single_accumulator(tokens):
    whole, first, second = (InputStatistics(6, track_gram=True) for _ in range(3))
    whole.add_batch(tokens)
    first.add_batch(tokens[:15])
    second.add_batch(tokens[15:])
    assert first.merge(second) is first
    assert first.num_tokens == 40
    torch.testing.assert_close(first.gram(), whole.gram())
    torch.testing.assert_close(first.feature_norms(), whole.feature_norms())


def test_low_precision_input_is_accumulated_in_float32():
    x = torch.full((3, 2), 300.0, dtype=torch.float16)  # 300^2 * 3 overflows float16
    stats = InputStatistics(2)
    stats.add_batch(x)
    torch.testing.assert_close(stats.feature_norms(), torch.full((2,), 300.0 * 3**0.5))


def test_errors_are_clear():
    stats = InputStatistics(4)
    with pytest.raises(RuntimeError, match="add_batch"):
        stats.feature_norms()
    with pytest.raises(ValueError, match="3 features"):
        stats.add_batch(torch.zeros(2, 3))
    stats.add_batch(torch.ones(2, 4))
    with pytest.raises(RuntimeError, match="track_gram=True"):
        stats.hessian()
    with pytest.raises(ValueError, match="Gram"):
        InputStatistics(4, track_gram=True).merge(stats)
