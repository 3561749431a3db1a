"""Pruning metrics against hand-computed values of their definitions (the docstrings of algorithms/scores.py)."""

import pytest
import torch

from optimum_permllm.algorithms import magnitude_scores, ria_scores, score_fn, wanda_scores
from optimum_permllm.algorithms.refit import DampedGram
from optimum_permllm.algorithms.scores import obs_feature_weights

WEIGHT = torch.tensor([[1.0, -2.0], [-3.0, 4.0]])
NORMS = torch.tensor([4.0, 9.0])


def test_magnitude():
    scores = magnitude_scores(WEIGHT.to(torch.bfloat16))
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


def test_wanda():
    torch.testing.assert_close(wanda_scores(WEIGHT, NORMS), torch.tensor([[4.0, 18.0], [12.0, 36.0]]))


def test_ria_hand_computed():
    # column sums |W|: [4, 6]; row sums: [3, 7]; sqrt(norms): [2, 3]
    expected = torch.tensor(
        [
            [(1 / 4 + 1 / 3) * 2, (2 / 6 + 2 / 3) * 3],
            [(3 / 4 + 3 / 7) * 2, (4 / 6 + 4 / 7) * 3],
        ]
    )
    torch.testing.assert_close(ria_scores(WEIGHT, NORMS), expected)
    torch.testing.assert_close(ria_scores(WEIGHT, NORMS, alpha=1.0), expected / torch.tensor([2.0, 3.0]) * NORMS)


def test_ria_zero_row_and_column_give_zero_not_nan():
    weight = torch.tensor([[0.0, 0.0], [0.0, 5.0]])
    scores = ria_scores(weight, torch.ones(2))
    torch.testing.assert_close(scores, torch.tensor([[0.0, 0.0], [0.0, 2.0]]))


def test_score_fn_dispatch():
    assert score_fn("wanda") is wanda_scores
    assert score_fn("RIA") is ria_scores
    torch.testing.assert_close(score_fn("magnitude")(WEIGHT, NORMS), WEIGHT.abs())
    with pytest.raises(ValueError, match="magnitude, ria, wanda"):
        score_fn("sparsegpt")


def test_shape_errors():
    with pytest.raises(ValueError, match="3 input features"):
        wanda_scores(torch.ones(2, 3), torch.ones(2))
    with pytest.raises(ValueError, match="feature norms"):
        ria_scores(WEIGHT, None)


def test_obs_feature_weights_are_the_residual_norms_of_each_input_on_the_others():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 6, generator=gen, dtype=torch.float64)
    weights = obs_feature_weights(DampedGram.from_gram((x.T @ x / x.shape[0]).float(), 0.0))
    for j in range(6):
        others = torch.cat([x[:, :j], x[:, j + 1:]], dim=1)
        fit = others @ torch.linalg.lstsq(others, x[:, j:j + 1]).solution
        residual = (x[:, j:j + 1] - fit).square().mean().sqrt()
        torch.testing.assert_close(weights[j], residual.float(), rtol=1e-3, atol=1e-5)


def test_obs_feature_weights_give_dead_inputs_zero_and_explain_a_singular_gram_matrix():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    x[:, 2] = 0
    weights = obs_feature_weights(DampedGram.from_gram(x.T @ x / 50, 0.01))
    assert weights[2] == 0 and bool((weights[[0, 1, 3]] > 0).all())
    assert bool((obs_feature_weights(DampedGram.from_gram(torch.zeros(4, 4), 0.01)) == 0).all())  # nothing to rank
    singular = torch.ones(4, 4)  # rank one, undamped
    with pytest.raises(RuntimeError, match="damp"):
        obs_feature_weights(DampedGram.from_gram(singular, 0.0))
