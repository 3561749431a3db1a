"""The least-squares update of the weights an N:M mask keeps.

For a row w, a kept set K and inputs with Gram matrix G, the kept values that minimise the output error
(w - w')^T G (w - w') solve G_KK w'_K = G_K: w. SparseGPT approximates this with a sequential sweep that
can only move columns to the right of the one being pruned; here every row's system is solved, on a
damped G (as SparseGPT damps its Hessian) so that it stays well posed and does not fit the calibration
text too closely. The solver is preconditioned conjugate gradients, all rows at once, each row stopped
once it is within `TOLERANCE` of its optimum. The preconditioner is (G^-1)_KK, the inverse of the full
damped matrix restricted to the kept set: it is the inverse of the Schur complement of the pruned set,
so r^T z bounds the error that further iterations can still remove, and it needs far fewer iterations
than a diagonal preconditioner (research/FINDINGS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A row stops when the error that further iterations could still remove is below TOLERANCE times its
# current error (0.1%); MAX_ITERATIONS bounds the cost of a badly conditioned layer, and rows that reach
# it are reported (`Refit.converged`).
TOLERANCE = 1e-3
MAX_ITERATIONS = 100
_TINY = torch.finfo(torch.float32).tiny
# Below this many calibration tokens per input the refit fits the calibration text more than the layer, and
# gains little over no refit on other text: the pipeline warns (research/FINDINGS.md).
FEW_TOKENS_PER_INPUT = 4


@torch.no_grad()
def evidence_damp(weights: torch.Tensor, updated: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor,
                  tokens: int) -> float:
    """The refit's dampening, estimated from the data as a ridge regression's best penalty.

    The refit is a ridge regression of each row's output on its kept inputs, whose penalty
    damp * mean(diag G) * ||w'_K - w_K||^2 assumes that the compensation w'_K - w_K is drawn with variance
    tau^2 while the output keeps a residual of variance sigma^2 per token; the penalty that predicts other
    text best is then sigma^2 / (tokens * tau^2). Both are read off a first solution of the same problem
    (SparseGPT's update of the same mask: `updated`): sigma^2 its output error per row, tau^2 the mean
    square of its changes to the kept weights. Few tokens for many inputs raise the penalty, as does a
    residual that a large compensation cannot explain. The rows of every linear that reads the input come
    stacked; all tensors share `gram`'s column order."""
    g = gram.float()
    delta = weights.float() - updated.float()
    residual = float(row_output_errors(delta, g).sum())
    changes, kept = float(delta[keep].square().sum()), float(keep.sum())
    mean_diagonal = float(torch.diagonal(g).mean())
    if changes <= 0 or mean_diagonal <= 0 or tokens <= 0:
        return 0.0
    sigma2, tau2 = residual / weights.shape[0], changes / kept
    return sigma2 / (tokens * tau2 * mean_diagonal)


def damped_gram(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """Symmetric float32 G + damp * mean(diag G) * I, as SparseGPT damps its Hessian. An input never active
    in calibration (G_jj = 0) gets the mean of the live diagonal, so that the matrix stays invertible and
    its weight, uncoupled from the others, is left as it is."""
    g = gram.float()
    g = 0.5 * (g + g.T)
    diagonal = torch.diagonal(g)
    dead = diagonal == 0
    live_mean = diagonal[~dead].mean() if bool((~dead).any()) else torch.ones((), dtype=g.dtype, device=g.device)
    g = g + torch.diag(dead.to(g.dtype) * live_mean)
    return g + damp * torch.diagonal(g).mean() * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)


@dataclass(frozen=True)
class DampedGram:
    """One input's damped Gram matrix, its inverse and its dead inputs, computed once (`from_gram`) and shared
    by every linear that reads the input: the refit's operator and preconditioner, and the OBS weights of
    `scores.obs_feature_weights`."""

    matrix: torch.Tensor
    inverse: torch.Tensor
    dead: torch.Tensor
    damp: float

    @classmethod
    def from_gram(cls, gram: torch.Tensor, damp: float) -> DampedGram:
        if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
            raise ValueError(f"DampedGram needs a square [C, C] Gram matrix, got {tuple(gram.shape)}.")
        matrix = damped_gram(gram, damp)
        lower, info = torch.linalg.cholesky_ex(matrix)
        if int(info) != 0:
            raise RuntimeError(
                f"The damped Gram matrix (damp={damp}) of this layer is not positive definite. Raise the dampening, "
                "e.g. PermLLMConfig(damp=0.1), or calibrate on more text (num_samples, seq_len)."
            )
        return cls(matrix, torch.cholesky_inverse(lower), torch.diagonal(gram) == 0, damp)

    def permuted(self, perm: torch.Tensor) -> DampedGram:
        """The same system in the column order `perm` (the inverse of a permuted matrix is the permuted inverse)."""
        return DampedGram(self.matrix[perm][:, perm], self.inverse[perm][:, perm], self.dead[perm], self.damp)

    @property
    def width(self) -> int:
        return self.matrix.shape[0]


@dataclass
class Refit:
    """Refitted float32 weights [rows, C] (zero outside the mask), each row's damped output error, the
    iterations each row ran, and whether it reached the tolerance before `MAX_ITERATIONS`."""

    weight: torch.Tensor
    error: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor


@torch.no_grad()
def refit_kept(weight: torch.Tensor, system: DampedGram, keep: torch.Tensor, start: torch.Tensor | None = None,
               tolerance: float = TOLERANCE, max_iterations: int = MAX_ITERATIONS) -> Refit:
    """Refit each row's kept values to minimise its output error on `system`'s damped Gram matrix.

    All tensors share one column order; `keep` may keep any number of weights per row. `start` (e.g.
    SparseGPT's updated weights for the same mask) is where the iterations begin; by default the kept
    weights unchanged. The result is never worse than the start on the damped error, and each converged row's
    error is within `tolerance` (relative) of its optimum.
    """
    solver = _RowSolver(weight, system, keep, start, tolerance)
    for _ in range(max_iterations):
        if solver.active.numel() == 0:
            break
        solver.step()
    return solver.result()


@torch.no_grad()
def refit_best_of(weight: torch.Tensor, system: DampedGram, keeps: list[torch.Tensor],
                  starts: list[torch.Tensor | None] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[Refit]]:
    """Refit `weight` on every candidate mask in `keeps` (from `starts`, default the unchanged kept weights)
    and keep, per row, the candidate whose refitted row has the lowest damped output error.

    The candidates are solved side by side, and a candidate's row stops as soon as it is sure to lose: its
    error minus r^T z (a lower bound on its optimum) is above another candidate's current error. The rows
    picked are those that refitting every candidate to its tolerance would pick; stopped rows count as
    converged in their `Refit`. Returns (float32 weights, bool mask, the candidates' `Refit`s)."""
    if not keeps:
        raise ValueError("refit_best_of needs at least one candidate mask.")
    starts = starts or [None] * len(keeps)
    solvers = [_RowSolver(weight, system, keep, start, TOLERANCE) for keep, start in zip(keeps, starts)]
    for _ in range(MAX_ITERATIONS):
        _stop_losing_rows(solvers)
        if all(solver.active.numel() == 0 for solver in solvers):
            break
        for solver in solvers:
            if solver.active.numel():
                solver.step()
    fits = [solver.result() for solver in solvers]
    pick = torch.stack([fit.error for fit in fits]).argmin(0)
    rows = torch.arange(weight.shape[0], device=pick.device)
    best = torch.stack([fit.weight for fit in fits])[pick, rows]
    masks = torch.stack([keep.to(pick.device) for keep in keeps])[pick, rows]
    return best, masks, fits


def _stop_losing_rows(solvers: list[_RowSolver]) -> None:
    """Stop every candidate's rows whose lower bound on the optimum is above the best current error of the row."""
    if len(solvers) < 2:
        return
    best = torch.stack([solver.error for solver in solvers]).min(0).values
    for solver in solvers:
        if solver.active.numel():
            losing = solver.error[solver.active] - solver.rz[solver.active] > best[solver.active]
            solver.active = solver.active[~losing]


class _RowSolver:
    """Preconditioned conjugate gradients for every row of one mask, between iterations (see the module
    docstring): `x` the current kept values, `error` each row's damped output error, `rz` = r^T z, which
    bounds the error that further iterations can still remove, and `active` the rows still iterating."""

    def __init__(self, weight: torch.Tensor, system: DampedGram, keep: torch.Tensor, start: torch.Tensor | None,
                 tolerance: float):
        rows, columns = weight.shape
        if keep.shape != weight.shape or system.width != columns or (start is not None and start.shape != weight.shape):
            raise ValueError("refit_kept needs weight, keep (and start) [rows, C] and a gram [C, C]; got "
                             f"{tuple(weight.shape)}, {tuple(keep.shape)}, gram of width {system.width}.")
        w = weight.float()
        self.g, self.g_inverse = system.matrix.to(w.device), system.inverse.to(w.device)
        self.kept = keep.to(w.device).float()
        self.x = (w if start is None else start.to(w.device).float()) * self.kept
        pull = (w - self.x) @ self.g
        self.error = ((w - self.x) * pull).sum(1)
        self.residual = pull * self.kept  # minus half the error's gradient, on the kept positions
        z = (self.residual @ self.g_inverse) * self.kept
        self.direction, self.rz = z, (self.residual * z).sum(1)
        self.iterations = torch.zeros(rows, dtype=torch.long, device=w.device)
        self.tolerance = tolerance
        self.active = (self.rz > tolerance * self.error).nonzero().squeeze(1)

    def step(self) -> None:
        """One iteration on the active rows; rows within the tolerance of their optimum stop."""
        active = self.active
        d, mask, rz = self.direction[active], self.kept[active], self.rz[active]
        step = (d @ self.g) * mask
        alpha = rz / (d * step).sum(1).clamp_min(_TINY)
        self.x[active] += alpha.unsqueeze(1) * d
        self.error[active] -= alpha * rz
        r = self.residual[active] - alpha.unsqueeze(1) * step
        z = (r @ self.g_inverse) * mask
        rz_next = (r * z).sum(1)
        self.direction[active] = z + (rz_next / rz.clamp_min(_TINY)).unsqueeze(1) * d
        self.residual[active], self.rz[active] = r, rz_next
        self.iterations[active] += 1
        self.active = active[rz_next > self.tolerance * self.error[active]]

    def result(self) -> Refit:
        """The refit so far; rows still active have reached the iteration cap."""
        converged = torch.ones_like(self.iterations, dtype=torch.bool)
        converged[self.active] = False
        return Refit(weight=self.x, error=self.error.clamp_min(0), iterations=self.iterations, converged=converged)


def row_output_errors(delta: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """d_i G d_i^T for every row d_i of `delta` [rows, C]: each output's squared error on the Gram matrix."""
    return (delta * (delta @ gram.float().to(delta.device))).sum(-1)
