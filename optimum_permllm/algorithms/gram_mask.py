"""The N:M mask that minimises a layer's exact output error, with the kept weights left as they are.

Pruning row w of a linear to w' leaves the output error (w - w')^T G (w - w') on inputs with Gram matrix
G = X^T X / n. Wanda keeps the largest |w_j| * sqrt(G_jj) in every group, which minimises only the
diagonal part of that error; pruned weights whose inputs are correlated can cancel or add up. Here each
row's mask is improved by exact coordinate descent over its N:M groups: for one group at a time, every
way of keeping N of its M weights is scored exactly given the rest of the row, and the best is taken.
Rows are independent, so all rows move together, and a row that a sweep leaves unchanged is done. Weight
values are never changed (no update), so the cost stays small: a few sweeps, each about one and a half
[rows, C] x [C, C] products over the rows still moving.

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
# Columns per block of the lazy updates of the running products (GPTQ's block size).
_BLOCK_COLUMNS = 128


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
    options = keep_options(n, m, w.device)
    dropped = (~options).to(w.dtype)  # [K, m]
    blocks = _diagonal_blocks(g, m)  # [groups, m, m]
    quadratic = _option_quadratics(w, blocks, dropped)  # [rows, groups, K]
    current = _option_index(keep, options, m)  # [rows, groups]: which option each group keeps
    # Rows are independent, and a row that a whole sweep left unchanged is at a fixed point of the descent:
    # every sweep after the first visits only the rows that the one before moved.
    moving = torch.arange(w.shape[0], device=w.device)
    for _ in range(sweeps):
        if moving.numel() == 0:
            break
        rows_current, moved = _sweep(w[moving], g, blocks, dropped, quadratic[moving], current[moving])
        current[moving] = rows_current
        moving = moving[moved]
    return options[current].reshape(w.shape)


def _sweep(w: torch.Tensor, g: torch.Tensor, blocks: torch.Tensor, dropped: torch.Tensor, quadratic: torch.Tensor,
           current: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of exact coordinate descent over the N:M groups of the rows of `w`, from the options `current`;
    returns the new options (updated in place) and which rows moved.

    A row's error as a function of one group's pruned part d_g is 2 d_g . p_rest + d_g G_gg d_g, where p_rest is
    the pull of the rest of the row; the quadratic parts of every option of every group (`quadratic`) are
    computed once up front, so the loop over groups only adds the linear part. The pulls are kept current
    lazily, as GPTQ applies its updates: a move updates at once only the pulls of the columns left in its block
    of `_BLOCK_COLUMNS`, and each block's moves reach the later columns in one product when the block ends."""
    rows, width = w.shape
    m = dropped.shape[1]
    d = w * dropped[current].reshape(rows, width)
    p = d @ g  # each row's error gradient / 2, computed afresh; current for every column not yet visited
    scale = _STRICT * (d * p).sum(1)  # the smallest change that counts, per row
    moved = torch.zeros(rows, dtype=torch.bool, device=w.device)
    span = m * max(1, _BLOCK_COLUMNS // m)
    for start in range(0, width, span):
        stop = min(start + span, width)
        before = d[:, start:stop].clone()
        block_changed = False
        for group in range(start // m, stop // m):
            cols = slice(group * m, group * m + m)
            w_g, d_g = w[:, cols], d[:, cols]
            p_rest = p[:, cols] - d_g @ blocks[group]  # the rest of the row's pull on this group
            cost = 2 * (w_g * p_rest) @ dropped.T + quadratic[:, group]  # [rows, K]
            best_cost, best = cost.min(-1)
            gain = cost.gather(1, current[:, group:group + 1]).squeeze(1) - best_cost
            moves = gain > scale
            if not bool(moves.any()):
                continue
            block_changed = True
            moved |= moves
            current[:, group] = torch.where(moves, best, current[:, group])
            new = w_g * dropped[current[:, group]]
            later = slice(cols.stop, stop)  # rows that did not move add zero: cheaper than gathering those that did
            p[:, later] += (new - d_g) @ g[cols, later]
            d[:, cols] = new
        if block_changed and stop < width:
            p[:, stop:] += (d[:, start:stop] - before) @ g[start:stop, stop:]
    return current, moved


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
