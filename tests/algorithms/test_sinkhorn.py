"""log_sinkhorn: doubly stochastic output, agreement with the plain Sinkhorn, stability, batching."""

import pytest
import torch

from optimum_permllm.algorithms.sinkhorn import log_sinkhorn


def plain_sinkhorn(alpha: torch.Tensor, n_iters: int) -> torch.Tensor:
    """Reference: alternate row and column normalisation in probability space (float64)."""
    p = alpha.double()
    for _ in range(n_iters):
        p = p / p.sum(-1, keepdim=True)
        p = p / p.sum(-2, keepdim=True)
    return p


def test_matches_plain_sinkhorn():
    logits = torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = plain_sinkhorn(logits.exp(), 7)
    torch.testing.assert_close(log_sinkhorn(logits, 7).exp(), expected)


def test_converges_to_doubly_stochastic():
    logits = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(1))
    p = log_sinkhorn(logits, 200).exp()
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 8), atol=1e-5, rtol=0)
    torch.testing.assert_close(p.sum(-2), torch.ones(2, 8), atol=1e-5, rtol=0)


def test_last_step_normalises_columns_exactly():
    p = log_sinkhorn(torch.randn(4, 5, 5, generator=torch.Generator().manual_seed(2)), 1).exp()
    torch.testing.assert_close(p.sum(-2), torch.ones(4, 5))


@pytest.mark.parametrize("tau", [1e-3, 1e-6])
def test_tiny_temperature_stays_finite_and_picks_the_permutation(tau):
    perm = torch.tensor([2, 0, 3, 1])
    logits = torch.rand(4, 4, generator=torch.Generator().manual_seed(3)) * 0.1
    logits[torch.arange(4), perm] = 1.0  # the dominant assignment row r -> perm[r]
    p = log_sinkhorn(logits / tau, 5).exp()  # exp(logits / tau) alone would overflow
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p, torch.eye(4)[perm], atol=1e-6, rtol=0)


def test_batched_leading_dims_equal_per_matrix():
    logits = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(4))
    batched = log_sinkhorn(logits, 5)
    single = torch.stack([torch.stack([log_sinkhorn(x, 5) for x in row]) for row in logits])
    torch.testing.assert_close(batched, single)


def test_gradient_flows_and_is_finite():
    logits = torch.randn(2, 4, 4, requires_grad=True)
    (log_sinkhorn(logits / 0.01, 5).exp() * torch.randn(2, 4, 4)).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(4,), (3, 4), (2, 3, 4)])
def test_rejects_non_square(shape):
    with pytest.raises(ValueError, match="square"):
        log_sinkhorn(torch.zeros(shape))
