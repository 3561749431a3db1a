"""The least-squares update of the weights an N:M mask keeps.

For a row w, a kept set K and inputs with Gram matrix G, the kept values that minimise the output error
(w - w')^T G (w - w') solve G_KK w'_K = G_K: w. SparseGPT approximates this with a sequential sweep that
can only move columns to the right of the one being pruned; here every row's system is solved to
convergence, on a damped G (as SparseGPT damps its Hessian) so that it stays well posed. The solver is
conjugate gradients with a Jacobi preconditioner, all rows at once: each iteration is one [rows, C] x
[C, C] product with the kept positions masked (about the multiply-adds of SparseGPT's whole sweep over
the layer), and it only ever lowers the error of its starting point, the unchanged kept weights.
"""

from __future__ import annotations

import torch

# Convergence: stop when every row's preconditioned residual has fallen below TOLERANCE times its start
# (on SmolLM2's layer-15 linears this matches an exact Cholesky solve to 4 digits of held-out error:
# research/refit_solver_check.py); MAX_ITERATIONS bounds the cost of a badly conditioned layer.
TOLERANCE = 1e-3
MAX_ITERATIONS = 100


def damped_gram(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """Symmetric float32 G + damp * mean(diag G) * I, as SparseGPT damps its Hessian."""
    g = gram.float()
    g = 0.5 * (g + g.T)
    return g + damp * torch.diagonal(g).mean() * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)


@torch.no_grad()
def refit_kept(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Return float32 [rows, C]: zero where `keep` is False, and elsewhere each row's kept values refitted to
    minimise its output error on G + damp * mean(diag G) * I. All tensors share one column order; `keep`
    may keep any number of weights per row."""
    rows, columns = weight.shape
    if keep.shape != weight.shape or gram.shape != (columns, columns):
        raise ValueError("refit_kept needs weight and keep [rows, C] and gram [C, C]; got "
                         f"{tuple(weight.shape)}, {tuple(keep.shape)}, {tuple(gram.shape)}.")
    w = weight.float()
    g = damped_gram(gram, damp).to(w.device)
    kept = keep.to(w.device).float()
    x = w * kept
    residual = ((w - x) @ g) * kept  # minus the error's gradient / 2, on the kept positions
    diagonal = torch.diagonal(g)
    inverse_diagonal = torch.where(diagonal > 0, 1.0 / diagonal, torch.zeros_like(diagonal))  # a dead input stays put
    z = residual * inverse_diagonal
    direction = z.clone()
    rz = (residual * z).sum(1, keepdim=True)
    target = TOLERANCE**2 * rz
    for _ in range(MAX_ITERATIONS):
        if bool((rz <= target).all()):
            break
        step = (direction @ g) * kept
        alpha = rz / (direction * step).sum(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        x += alpha * direction
        residual -= alpha * step
        z = residual * inverse_diagonal
        rz_next = (residual * z).sum(1, keepdim=True)
        direction = z + rz_next / rz.clamp_min(torch.finfo(torch.float32).tiny) * direction
        rz = rz_next
    return x


@torch.no_grad()
def refit_best_of(weight: torch.Tensor, gram: torch.Tensor, keeps: list[torch.Tensor],
                  damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Refit `weight` on every candidate mask in `keeps` and keep, per row, the candidate whose refitted row
    has the lowest output error on `gram`. Returns (float32 weights, bool mask), both [rows, C]."""
    if not keeps:
        raise ValueError("refit_best_of needs at least one candidate mask.")
    w = weight.float()
    fits = torch.stack([refit_kept(w, gram, keep, damp) for keep in keeps])  # [K, rows, C]
    errors = torch.stack([row_output_errors(w - fit, gram) for fit in fits])  # [K, rows]
    pick = errors.argmin(0)
    rows = torch.arange(w.shape[0], device=w.device)
    masks = torch.stack([keep.to(w.device) for keep in keeps])
    return fits[pick, rows], masks[pick, rows]


def row_output_errors(delta: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """d_i G d_i^T for every row d_i of `delta` [rows, C]: each output's squared error on the Gram matrix."""
    return (delta * (delta @ gram.float().to(delta.device))).sum(-1)
