"""The N:M mask that minimises a layer's exact output error, with the kept weights left as they are.

Pruning row w of a linear to w' leaves the output error (w - w')^T G (w - w') on inputs with Gram matrix
G = X^T X / n. Wanda keeps the largest |w_j| * sqrt(G_jj) in every group, which minimises only the
diagonal part of that error; pruned weights whose inputs are correlated can cancel or add up. Here each
row's mask is improved by exact coordinate descent over its N:M groups: for one group at a time, every
way of keeping N of its M weights is scored exactly given the rest of the row, and the best is taken.
Rows are independent, so all rows move together. Weight values are never changed (no update), so the
cost stays in Wanda's class: a few sweeps, each about one [rows, C] x [C, C] product.

The error is taken on G + mu * diag(G): a `mu` above 0 weighs the diagonal part more than the
cancellations between pruned weights, which are fitted to the calibration text and carry less to
other text (mu = 0 is the exact calibration error; mu -> infinity gives back Wanda's mask).
"""

from __future__ import annotations

import itertools

import torch

from .refit import row_output_errors

# mu: the held-out error of 12 SmolLM2 layer groups is lowest at 0.3 or within 0.5% of it (BENCHMARKS.md,
# "Gram-chosen mask and permutation headroom, per layer group"). Sweeps: a budget; the descent stops
# earlier when a sweep changes nothing.
DEFAULT_MU = 0.3
DEFAULT_SWEEPS = 8


def keep_options(n: int, m: int, device=None) -> torch.Tensor:
    """[C(m, n), m] bool: every way of keeping n of m consecutive weights."""
    rows = [[j in kept for j in range(m)] for kept in itertools.combinations(range(m), n)]
    return torch.tensor(rows, dtype=torch.bool, device=device)


def robust_gram(gram: torch.Tensor, mu: float) -> torch.Tensor:
    """Symmetric float32 G + mu * diag(G)."""
    g = gram.float()
    g = 0.5 * (g + g.T)
    return g + mu * torch.diag(torch.diagonal(g)) if mu else g


def output_error(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[rows] exact output error d^T G d of each row pruned to `keep` (all in the same column order)."""
    return row_output_errors(weight.float().masked_fill(keep, 0), gram)


@torch.no_grad()
def gram_mask(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, n: int, m: int,
              mu: float = DEFAULT_MU, sweeps: int = DEFAULT_SWEEPS) -> torch.Tensor:
    """Improve the N:M keep mask of every row of `weight` [rows, C] on the error of `gram` [C, C] + mu diag.

    All three tensors are in the same (permuted) column order, whose consecutive m-groups are the N:M
    groups; `keep` is the starting mask (e.g. Wanda's). Returns a mask whose error on G + mu diag(G) is
    never above the start's, row by row.
    """
    if weight.shape[1] % m or keep.shape != weight.shape or gram.shape != (weight.shape[1],) * 2:
        raise ValueError(f"gram_mask needs weight/keep [rows, C] with C divisible by {m} and gram [C, C]; "
                         f"got {tuple(weight.shape)}, {tuple(keep.shape)}, {tuple(gram.shape)}.")
    w = weight.float()
    g = robust_gram(gram, mu).to(w.device)
    keep = keep.clone()
    d = w.masked_fill(keep, 0)
    p = d @ g  # p = D G: each row's error gradient / 2, kept up to date as groups change
    options = keep_options(n, m, w.device)
    dropped = (~options).float()  # [K, m]
    rows = torch.arange(w.shape[0], device=w.device)
    for _ in range(sweeps):
        changed = False
        for start in range(0, w.shape[1], m):
            cols = slice(start, start + m)
            g_cc = g[cols, cols]
            d_old = d[:, cols]
            p_rest = p[:, cols] - d_old @ g_cc  # the rest of the row's pull on this group
            d_new = w[:, cols].unsqueeze(1) * dropped  # [rows, K, m]: the pruned part under each option
            cost = 2 * (d_new * p_rest.unsqueeze(1)).sum(-1) + ((d_new @ g_cc) * d_new).sum(-1)
            best = cost.argmin(-1)
            new = d_new[rows, best]
            if not torch.equal(new, d_old):
                changed = True
                p += (new - d_old) @ g[cols, :]
                d[:, cols] = new
                keep[:, cols] = options[best]
        if not changed:
            break
    return keep
