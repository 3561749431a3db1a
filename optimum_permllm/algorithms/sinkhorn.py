"""Log-domain Sinkhorn normalisation: the differentiable relaxation of a permutation matrix.

Working on log-probabilities with logsumexp keeps every step finite for any temperature, so
`log_sinkhorn(logits / tau)` is safe even when `tau` is tiny and `exp(logits / tau)` would overflow.
"""

from __future__ import annotations

import torch


def log_sinkhorn(log_alpha: torch.Tensor, n_iters: int = 5) -> torch.Tensor:
    """Log of the (approximately) doubly stochastic matrix made from `log_alpha` [..., k, k].

    Each iteration normalises the rows, then the columns, in log space (logsumexp), so the last
    step leaves every column summing exactly to one and the rows approximately so. Leading
    dimensions are batch dimensions.
    """
    if log_alpha.dim() < 2 or log_alpha.shape[-1] != log_alpha.shape[-2]:
        raise ValueError(f"log_sinkhorn expects square matrices [..., k, k], got shape {tuple(log_alpha.shape)}.")
    if n_iters < 1:
        raise ValueError(f"n_iters must be at least 1, got {n_iters}.")
    for _ in range(n_iters):
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=-1, keepdim=True)
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=-2, keepdim=True)
    return log_alpha
