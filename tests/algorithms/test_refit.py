"""The refit of kept weights: the least-squares fit on the inputs, within its tolerance of the optimum, never
worse than no update or SparseGPT, and the damping it uses when calibration is small for the layer."""

import pytest
import torch

from optimum_permllm.algorithms.gram_mask import output_error
from optimum_permllm.algorithms.refit import (TOLERANCE, DampedGram, damped_gram, evidence_damp, refit_best_of,
                                              refit_kept)
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


def least_squares(x: torch.Tensor, w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The reference: each row's kept weights fitted by torch.linalg.lstsq on the inputs themselves."""
    out = torch.zeros_like(w)
    for row in range(w.shape[0]):
        kept = keep[row].nonzero().squeeze(1)
        out[row, kept] = torch.linalg.lstsq(x[:, kept], (x @ w[row]).unsqueeze(1)).solution.squeeze(1)
    return out


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_run_to_a_tight_tolerance_it_is_the_least_squares_fit_on_the_inputs(n, m):
    x = correlated_inputs(16).double()
    w = torch.randn(5, 16, generator=torch.Generator().manual_seed(1)).double()
    keep = nm_mask(w.abs(), n, m)
    fit = refit_kept(w, DampedGram.from_gram(x.T @ x / x.shape[0], 0.0), keep, tolerance=1e-12)
    assert bool((fit.weight[~keep] == 0).all()) and bool(fit.converged.all())
    torch.testing.assert_close(fit.weight.double(), least_squares(x, w, keep), atol=1e-4, rtol=1e-4)


def test_at_its_default_tolerance_each_rows_error_is_within_it_of_the_optimum():
    x = correlated_inputs(64, samples=512, seed=3).double()
    g = x.T @ x / x.shape[0]
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(2)).double()
    keep = nm_mask(w.abs(), 2, 4)
    fit = refit_kept(w, DampedGram.from_gram(g, 0.0), keep)
    optimum = update_error(w, least_squares(x, w, keep), g)
    achieved = update_error(w, fit.weight.double(), g)
    assert bool(fit.converged.all())
    assert bool((achieved <= optimum * (1 + TOLERANCE) + 1e-9).all())
    assert bool((achieved >= optimum * (1 - 1e-6)).all())  # the reference is the optimum: nothing beats it
    torch.testing.assert_close(fit.error.double(), achieved, rtol=1e-3, atol=1e-6)  # the tracked error is the true one


def test_never_worse_than_no_update_or_sparsegpt_and_a_warm_start_is_kept_or_improved():
    x = correlated_inputs(32)
    g = x.T @ x / x.shape[0]
    w = torch.randn(12, 32, generator=torch.Generator().manual_seed(2))
    sparse, keep = sparsegpt_prune(w, 2 * g, 2, 4, block_size=8, damp=0.01)
    system = DampedGram.from_gram(g, 0.01)
    gd = damped_gram(g, 0.01)
    cold = refit_kept(w, system, keep)
    warm = refit_kept(w, system, keep, start=sparse)
    sparsegpt_error = update_error(w, sparse, gd)
    for fit in (cold, warm):
        refit_error = update_error(w, fit.weight, gd)
        assert bool((refit_error <= output_error(w, gd, keep) + 1e-5).all())
        assert bool((refit_error <= sparsegpt_error + 1e-5).all())
        assert float(refit_error.sum()) < 0.99 * float(sparsegpt_error.sum())
    assert int(warm.iterations.sum()) < int(cold.iterations.sum())  # SparseGPT's update is most of the way


def test_rows_stop_one_by_one_and_a_row_at_the_cap_is_reported():
    x = correlated_inputs(32, seed=7)
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(8))
    keep = nm_mask(w.abs(), 2, 4)
    keep[0] = True  # nothing pruned in row 0: it is optimal from the start
    system = DampedGram.from_gram(x.T @ x / x.shape[0], 0.0)
    fit = refit_kept(w, system, keep)
    assert int(fit.iterations[0]) == 0 and torch.equal(fit.weight[0], w[0])
    assert int(fit.iterations[1:].min()) > 0
    capped = refit_kept(w, system, keep, max_iterations=1)
    assert not bool(capped.converged[1:].any()) and bool(capped.converged[0])


@pytest.mark.parametrize("damp", [0.01, 0.0])
def test_a_dead_input_gives_finite_weights_and_the_least_squares_fit_of_the_others(damp):
    x = correlated_inputs(8)
    x[:, 3] = 0
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(4))
    keep = nm_mask(w.abs(), 2, 4)
    keep[:, 3], keep[:, 2] = True, False  # the dead input is kept in every row
    fit = refit_kept(w, DampedGram.from_gram(x.T @ x / x.shape[0], damp), keep, tolerance=1e-12)
    assert bool(torch.isfinite(fit.weight).all())
    torch.testing.assert_close(fit.weight[:, 3], w[:, 3])  # nothing to fit on the dead input: it keeps its value
    if damp == 0:  # the rest is the least-squares fit
        live = keep.clone()
        live[:, 3] = False
        torch.testing.assert_close(fit.weight.masked_fill(~live, 0), least_squares(x, w, live), atol=1e-4, rtol=1e-4)


def test_bad_shapes_are_refused():
    w = torch.randn(4, 8)
    keep = nm_mask(w.abs(), 2, 4)
    with pytest.raises(ValueError, match="keep"):
        refit_kept(w, DampedGram.from_gram(torch.eye(8), 0.01), keep[:2])
    with pytest.raises(ValueError, match="gram"):
        refit_kept(w, DampedGram.from_gram(torch.eye(4), 0.01), keep)
    with pytest.raises(ValueError, match="square"):
        DampedGram.from_gram(torch.ones(4, 3), 0.01)


def test_a_singular_gram_without_damping_is_explained():
    singular = torch.ones(4, 4)  # rank one, every input live
    with pytest.raises(RuntimeError, match="Raise the dampening"):
        DampedGram.from_gram(singular, 0.0)


def test_best_of_takes_each_rows_lower_refit_and_its_mask():
    x = correlated_inputs(16, seed=2)
    g = x.T @ x / x.shape[0]
    w = torch.randn(12, 16, generator=torch.Generator().manual_seed(3))
    # The second candidate keeps 1 of 4 in rows 0-5 (worse than 2:4) and 3 of 4 in rows 6-11 (better).
    second = torch.cat([nm_mask(w[:6].abs(), 1, 4), nm_mask(w[6:].abs(), 3, 4)])
    keeps = [nm_mask(w.abs(), 2, 4), second]
    system = DampedGram.from_gram(g, 0.01)
    new, mask, fits = refit_best_of(w, system, keeps)
    errors = torch.stack([update_error(w, fit.weight, system.matrix) for fit in fits])
    torch.testing.assert_close(update_error(w, new, system.matrix), errors.min(0).values)
    for row, pick in enumerate(errors.argmin(0).tolist()):
        assert torch.equal(mask[row], keeps[pick][row]) and torch.equal(new[row], fits[pick].weight[row])
    assert errors.argmin(0).tolist() == [0] * 6 + [1] * 6  # each candidate wins where it must


def test_best_of_picks_what_refitting_every_candidate_would_and_stops_the_losers_early():
    """Solving the candidates side by side and stopping rows that are sure to lose changes nothing but the
    work: each row gets the mask and (within float rounding) the weights of the full refits' winner."""
    x = correlated_inputs(32, seed=9)
    g = x.T @ x / x.shape[0]
    gen = torch.Generator().manual_seed(10)
    w = torch.randn(60, 32, generator=gen)
    keeps = [nm_mask(w.abs() * torch.diagonal(g).sqrt(), 2, 4), nm_mask(torch.rand(60, 32, generator=gen), 2, 4)]
    system = DampedGram.from_gram(g, 0.01)
    full = [refit_kept(w, system, keep) for keep in keeps]
    errors = torch.stack([fit.error for fit in full])
    clear = (errors[0] - errors[1]).abs() > 4 * TOLERANCE * errors.min(0).values  # not a tie within tolerance
    new, mask, fits = refit_best_of(w, system, keeps)
    winner = errors.argmin(0)
    assert 0 < int(winner.sum()) < 60 and int(clear.sum()) > 50  # both candidates win some rows, few ties
    for row in clear.nonzero().squeeze(1).tolist():
        assert torch.equal(mask[row], keeps[int(winner[row])][row])
        torch.testing.assert_close(new[row], full[int(winner[row])].weight[row], rtol=1e-4, atol=1e-5)
    raced = sum(int(fit.iterations.sum()) for fit in fits)
    assert raced < 0.9 * sum(int(fit.iterations.sum()) for fit in full)  # losing rows stopped early
    assert all(bool(fit.converged.all()) for fit in fits)


def test_best_of_needs_a_candidate():
    with pytest.raises(ValueError, match="candidate"):
        refit_best_of(torch.ones(2, 4), DampedGram.from_gram(torch.eye(4), 0.01), [])


def test_refitting_all_but_one_weight_leaves_its_obs_saliency():
    x = correlated_inputs(8, seed=5)
    g = x.T @ x / x.shape[0]
    w = torch.randn(1, 8, generator=torch.Generator().manual_seed(6))
    system = DampedGram.from_gram(g, 0.0)
    weights = obs_feature_weights(system)
    for j in range(8):
        keep = torch.ones(1, 8, dtype=torch.bool)
        keep[0, j] = False
        error = update_error(w, refit_kept(w, system, keep, tolerance=1e-12).weight, g)
        torch.testing.assert_close(error, (w[:, j] * weights[j]).square(), rtol=1e-3, atol=1e-6)


def test_a_permuted_system_is_the_system_of_the_permuted_gram():
    x = correlated_inputs(12, seed=9)
    g = x.T @ x / x.shape[0]
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    direct, moved = DampedGram.from_gram(g[perm][:, perm], 0.01), DampedGram.from_gram(g, 0.01).permuted(perm)
    torch.testing.assert_close(moved.matrix, direct.matrix)
    torch.testing.assert_close(moved.inverse, direct.inverse, rtol=1e-4, atol=1e-5)


def test_evidence_damp_hand_computed():
    """sigma^2 = mean output error per row, tau^2 = mean square change per kept weight, damp = sigma^2 /
    (tokens * tau^2 * mean diag G). On G = 2 I: row errors 2 * (1 + 4) = 10 and 2 * 9 = 18 (mean 14); changes
    1 (kept) + 4 (pruned) and 9 (pruned): kept changes 1 and 0 over 4 kept weights (tau^2 = 1/4)."""
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [3.0, 1.0, 1.0, 1.0]])
    new = torch.tensor([[0.0, 0.0, 3.0, 4.0], [0.0, 1.0, 1.0, 1.0]])
    keep = torch.tensor([[True, False, True, False], [False, True, False, True]])
    # row 0: kept 0 (changed by 1) and 2 (unchanged); pruned 1 (by 2) and 3 (by 0: new keeps 4, counted as error)
    gram = 2 * torch.eye(4)
    delta = w - new
    sigma2 = float((2 * delta.square().sum(1)).mean())
    tau2 = float(delta[keep].square().sum()) / 4
    assert evidence_damp(w, new, keep, gram, tokens=10) == pytest.approx(sigma2 / (10 * tau2 * 2.0))
    assert evidence_damp(w, w, keep, gram, tokens=10) == 0.0  # no change at all: nothing to estimate


def test_evidence_damp_falls_as_the_tokens_grow():
    x = correlated_inputs(16, seed=3)
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(5))
    new, keep = sparsegpt_prune(w, 2 * x.T @ x / x.shape[0], 2, 4, block_size=8)
    g = x.T @ x / x.shape[0]
    assert evidence_damp(w, new, keep, g, tokens=1000) == pytest.approx(
        4 * evidence_damp(w, new, keep, g, tokens=4000))


def test_with_few_tokens_per_input_the_evidence_damp_predicts_new_inputs_better_than_the_default():
    """A layer of 64 inputs calibrated on 72 tokens: the refit at the default damp fits those tokens; the
    damp estimated from SparseGPT's update is lower on fresh inputs from the same distribution."""
    width, gen = 64, torch.Generator().manual_seed(11)
    mixing = torch.randn(width, width, generator=gen) / 4 + torch.eye(width)
    calibration, fresh = torch.randn(72, width, generator=gen) @ mixing, torch.randn(4096, width, generator=gen) @ mixing
    w = torch.randn(32, width, generator=gen)
    g, g_fresh = calibration.T @ calibration / 72, fresh.T @ fresh / 4096
    updated, keep = sparsegpt_prune(w, 2 * g, 2, 4, block_size=16)
    damp = evidence_damp(w, updated, keep, g, tokens=72)
    assert damp > 0.01
    errors = {d: float(update_error(w, refit_kept(w, DampedGram.from_gram(g, d), keep, tolerance=1e-8).weight,
                                    g_fresh).sum()) for d in (0.01, damp)}
    assert errors[damp] < 0.95 * errors[0.01]
