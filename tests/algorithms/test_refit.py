"""The exact refit of kept weights: the least-squares fit on the inputs, never worse than no update or SparseGPT."""

import pytest
import torch

from optimum_permllm.algorithms.gram_mask import output_error
from optimum_permllm.algorithms.refit import damped_gram, refit_best_of, refit_kept
from optimum_permllm.algorithms.scores import obs_feature_weights
from optimum_permllm.algorithms.sparsegpt import sparsegpt_prune
from optimum_permllm.sparse import nm_mask


def correlated_inputs(width: int, samples: int = 256, seed: int = 0) -> torch.Tensor:
    """[samples, width] inputs with strongly correlated features."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=gen) / 2 + torch.eye(width)
    return torch.randn(samples, width, generator=gen) @ mixing


def update_error(w: torch.Tensor, new: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """[rows] output error (w - new)^T G (w - new)."""
    d = w - new
    return (d * (d @ g)).sum(-1)


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_matches_the_least_squares_fit_on_the_inputs(n, m):
    x = correlated_inputs(16)
    w = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    keep = nm_mask(w.abs(), n, m)
    new = refit_kept(w, x.T @ x / x.shape[0], keep, damp=0.0)
    assert bool((new[~keep] == 0).all())
    for row in range(w.shape[0]):
        kept = keep[row].nonzero().squeeze(1)
        fit = torch.linalg.lstsq(x[:, kept], (x @ w[row]).unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close(new[row, kept], fit, atol=1e-4, rtol=1e-4)


def test_never_worse_than_no_update_or_sparsegpt_on_its_damped_gram():
    x = correlated_inputs(32)
    g = x.T @ x / x.shape[0]
    w = torch.randn(12, 32, generator=torch.Generator().manual_seed(2))
    sparse, keep = sparsegpt_prune(w, g, 2, 4, block_size=8, damp=0.01)
    new = refit_kept(w, g, keep, damp=0.01)
    gd = damped_gram(g, 0.01)
    refit_error = update_error(w, new, gd)
    assert bool((refit_error <= output_error(w, gd, keep) + 1e-5).all())
    assert bool((refit_error <= update_error(w, sparse, gd) + 1e-5).all())
    assert float(refit_error.sum()) < float(update_error(w, sparse, gd).sum())


@pytest.mark.parametrize("damp", [0.01, 0.0])
def test_a_dead_input_gives_finite_weights_and_the_least_squares_fit_of_the_others(damp):
    x = correlated_inputs(8)
    x[:, 3] = 0
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(4))
    keep = nm_mask(w.abs(), 2, 4)
    keep[:, 3], keep[:, 2] = True, False  # the dead input is kept in every row
    new = refit_kept(w, x.T @ x / x.shape[0], keep, damp=damp)
    assert bool(torch.isfinite(new).all())
    if damp == 0:  # nothing to fit on the dead input: it keeps its value; the rest is the least-squares fit
        torch.testing.assert_close(new[:, 3], w[:, 3])
        for row in range(w.shape[0]):
            kept = keep[row].nonzero().squeeze(1)
            live = kept[kept != 3]
            fit = torch.linalg.lstsq(x[:, live], (x @ w[row]).unsqueeze(1)).solution.squeeze(1)
            torch.testing.assert_close(new[row, live], fit, atol=1e-4, rtol=1e-4)


def test_bad_shapes_are_refused():
    w = torch.randn(4, 8)
    keep = nm_mask(w.abs(), 2, 4)
    with pytest.raises(ValueError, match="keep"):
        refit_kept(w, torch.eye(8), keep[:2])
    with pytest.raises(ValueError, match="gram"):
        refit_kept(w, torch.eye(4), keep)


def test_best_of_takes_each_rows_lower_refit_and_its_mask():
    x = correlated_inputs(16, seed=2)
    g = x.T @ x / x.shape[0]
    w = torch.randn(12, 16, generator=torch.Generator().manual_seed(3))
    reweighted = w.abs() * torch.rand(16, generator=torch.Generator().manual_seed(4)).mul(4).exp()
    keeps = [nm_mask(w.abs(), 2, 4), nm_mask(reweighted, 2, 4)]
    new, mask = refit_best_of(w, g, keeps, damp=0.01)
    fits = [refit_kept(w, g, keep, damp=0.01) for keep in keeps]
    errors = torch.stack([update_error(w, fit, g) for fit in fits])
    torch.testing.assert_close(update_error(w, new, g), errors.min(0).values)
    for row, pick in enumerate(errors.argmin(0).tolist()):
        assert torch.equal(mask[row], keeps[pick][row]) and torch.equal(new[row], fits[pick][row])
    assert 0 < int(errors.argmin(0).sum()) < 12  # each candidate wins some rows, so the choice is exercised


def test_best_of_needs_a_candidate():
    with pytest.raises(ValueError, match="candidate"):
        refit_best_of(torch.ones(2, 4), torch.eye(4), [])


def test_refitting_all_but_one_weight_leaves_its_obs_saliency():
    x = correlated_inputs(8, seed=5)
    g = x.T @ x / x.shape[0]
    w = torch.randn(1, 8, generator=torch.Generator().manual_seed(6))
    weights = obs_feature_weights(g, damp=0.0)
    for j in range(8):
        keep = torch.ones(1, 8, dtype=torch.bool)
        keep[0, j] = False
        error = update_error(w, refit_kept(w, g, keep, damp=0.0), g)
        torch.testing.assert_close(error, (w[:, j] * weights[j]).square(), rtol=1e-3, atol=1e-6)
