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

# mu: the weight of the diagonal with the lowest held-out error (research/FINDINGS.md). Sweeps: a budget;
# the descent stops earlier when a sweep changes nothing.
DEFAULT_MU = 0.3
DEFAULT_SWEEPS = 8
# A group's mask changes only if that lowers the row's error by more than this fraction of it (float noise).
_STRICT = 1e-6


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
    never above the start's, row by row. A group changes only for a strict improvement (ties and float
    noise cannot make it cycle), and each sweep starts from freshly computed products.
    """
    if weight.shape[1] % m or keep.shape != weight.shape or gram.shape != (weight.shape[1],) * 2:
        raise ValueError(f"gram_mask needs weight/keep [rows, C] with C divisible by {m} and gram [C, C]; "
                         f"got {tuple(weight.shape)}, {tuple(keep.shape)}, {tuple(gram.shape)}.")
    w = weight.float()
    g = robust_gram(gram, mu).to(w.device)
    keep = keep.clone()
    options = keep_options(n, m, w.device)
    for _ in range(sweeps):
        if not _sweep(w, g, keep, options, m):
            break
    return keep


def _sweep(w: torch.Tensor, g: torch.Tensor, keep: torch.Tensor, options: torch.Tensor, m: int) -> bool:
    """One pass of exact coordinate descent over the N:M groups, updating `keep` in place; True if it changed.

    A row's error as a function of one group's pruned part d_g is 2 d_g . p_rest + d_g G_gg d_g, where p_rest is
    the pull of the rest of the row; the quadratic parts of every option of every group are computed at once
    up front, so the loop over groups only adds the linear part."""
    rows, width = w.shape
    dropped = (~options).to(w.dtype)  # [K, m]
    d = w.masked_fill(keep, 0)
    p = d @ g  # each row's error gradient / 2, recomputed every sweep and kept up to date within it
    scale = _STRICT * (d * p).sum(1)  # the smallest change that counts, per row
    blocks = _diagonal_blocks(g, m)  # [groups, m, m]
    quadratic = _option_quadratics(w, blocks, dropped)  # [rows, groups, K]
    current = _option_index(keep, options, m)  # [rows, groups]
    changed = False
    for group in range(width // m):
        cols = slice(group * m, group * m + m)
        w_g, d_g = w[:, cols], d[:, cols]
        p_rest = p[:, cols] - d_g @ blocks[group]  # the rest of the row's pull on this group
        cost = 2 * (w_g * p_rest) @ dropped.T + quadratic[:, group]  # [rows, K]
        best_cost, best = cost.min(-1)
        gain = cost.gather(1, current[:, group:group + 1]).squeeze(1) - best_cost
        moves = gain > scale
        if not bool(moves.any()):
            continue
        changed = True
        choice = torch.where(moves, best, current[:, group])
        new = w_g * dropped[choice]
        p += (new - d_g) @ g[cols, :]  # rows that did not move add zero: cheaper than gathering the rows that did
        d[:, cols] = new
        keep[:, cols] = options[choice]
        current[:, group] = choice
    return changed


def _diagonal_blocks(g: torch.Tensor, m: int) -> torch.Tensor:
    """[groups, m, m]: the blocks of `g` on its diagonal, one per N:M group."""
    groups = g.shape[0] // m
    return g.view(groups, m, groups, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def _option_quadratics(w: torch.Tensor, blocks: torch.Tensor, dropped: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """[rows, groups, K]: d G_gg d for the part d of each group that each option prunes (rows in chunks)."""
    rows, width = w.shape
    groups, m = blocks.shape[0], blocks.shape[1]
    pair = (dropped.unsqueeze(2) * dropped.unsqueeze(1)).reshape(len(dropped), m * m)  # [K, m*m]
    out = torch.empty(rows, groups, len(dropped), dtype=w.dtype, device=w.device)
    for start in range(0, rows, chunk):
        wg = w[start:start + chunk].view(-1, groups, m)
        outer = wg.unsqueeze(3) * wg.unsqueeze(2) * blocks  # [chunk, groups, m, m]
        out[start:start + chunk] = outer.reshape(-1, groups, m * m) @ pair.T
    return out


def _option_index(keep: torch.Tensor, options: torch.Tensor, m: int) -> torch.Tensor:
    """[rows, groups]: which of `options` each group of `keep` is (every group must be one of them)."""
    rows = keep.shape[0]
    codes = (keep.view(rows, -1, m).long() << torch.arange(m, device=keep.device)).sum(-1)
    lookup = torch.full((1 << m,), -1, dtype=torch.long, device=keep.device)
    lookup[(options.long() << torch.arange(m, device=keep.device)).sum(-1)] = torch.arange(len(options), device=keep.device)
    index = lookup[codes]
    if bool((index < 0).any()):
        raise ValueError("gram_mask's starting mask must keep exactly N of every M weights in each group.")
    return index
