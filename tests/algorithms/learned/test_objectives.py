"""The `model` scope's loss: 1 - cosine of the last hidden states per window, plain or with every feature divided
by its dense RMS, against hand-computed cases."""

import math

import pytest
import torch

from optimum_permllm.algorithms.learned import cosine_loss, feature_scale


def test_cosine_loss_is_one_minus_the_mean_token_cosine_of_each_window():
    # window 0: tokens (1, 0) vs (1, 0) -> cos 1 and (0, 1) vs (1, 1) -> cos 1/sqrt(2); window 1: (3, 4) vs (-3, -4)
    output = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[3.0, 4.0], [3.0, 4.0]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[-3.0, -4.0], [3.0, 4.0]]])
    expected = torch.tensor([1 - (1 + 1 / math.sqrt(2)) / 2, 1 - (-1 + 1) / 2])
    torch.testing.assert_close(cosine_loss(output, target), expected)


def test_a_massive_feature_decides_the_plain_cosine_and_not_the_standardised_one():
    # feature 0 carries 1000x the others: an error confined to features 1-2 barely moves the plain cosine
    target = torch.tensor([[[1000.0, 1.0, 1.0], [1000.0, -1.0, 1.0]]])
    output = target.clone()
    output[..., 1:] = 0
    scale = feature_scale(target)
    torch.testing.assert_close(scale, torch.tensor([1000.0, 1.0, 1.0]))
    assert float(cosine_loss(output, target)) < 1e-5
    # standardised, each token is (1, +-1, 1) against (1, 0, 0): cosine 1/sqrt(3)
    torch.testing.assert_close(cosine_loss(output, target, scale), torch.tensor([1 - 1 / math.sqrt(3)]))


def test_a_dead_feature_does_not_divide_by_zero():
    target = torch.tensor([[[2.0, 0.0], [2.0, 0.0]]])
    scale = feature_scale(target)
    assert scale[1] == pytest.approx(2e-6) and bool(torch.isfinite(cosine_loss(target + 1, target, scale)).all())
