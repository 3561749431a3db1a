"""Hard permutations from score matrices: one linear sum assignment (Hungarian) per block.

Used to harden soft Sinkhorn permutations. The blocks are solved by scipy's exact solver after a
single tensor-to-numpy conversion; scipy releases the GIL, so many blocks run on a small thread pool.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

# Fewest blocks that are solved in a thread pool; below it, starting the threads costs more than the
# assignments. A cost threshold only: the result does not depend on it.
_POOL_MIN_BLOCKS = 16


def batched_assignment(score: torch.Tensor, maximize: bool = True, workers: int | None = None) -> torch.Tensor:
    """Optimal assignment of every block of `score` [b, k, k]: perms [b, k] with row r -> column perms[:, r].

    `perms[i]` maximises (or minimises) `score[i, r, perms[i, r]]` summed over r. The hard
    permutation matrix is `P[i, r, perms[i, r]] = 1`. NaN scores are rejected.
    """
    from scipy.optimize import linear_sum_assignment  # here: scipy.optimize takes ~0.25 s to import

    if score.dim() != 3 or score.shape[-1] != score.shape[-2]:
        raise ValueError(f"batched_assignment expects square blocks [b, k, k], got shape {tuple(score.shape)}.")
    blocks = score.detach().to(device="cpu", dtype=torch.float64).numpy()
    if np.isnan(blocks).any():
        raise ValueError("batched_assignment got NaN scores; check the logits or the temperature.")

    def solve(block: np.ndarray) -> np.ndarray:
        return linear_sum_assignment(block, maximize=maximize)[1]

    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    if workers > 1 and blocks.shape[0] >= _POOL_MIN_BLOCKS:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            columns = list(pool.map(solve, blocks))
    else:
        columns = [solve(block) for block in blocks]
    perms = np.stack(columns) if columns else np.zeros((0, score.shape[-1]), dtype=np.int64)
    return torch.from_numpy(perms.astype(np.int64)).to(score.device)


def assignment_matrix(perms: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 0/1 matrices [b, k, k] of `perms` [b, k]: entry (r, perms[r]) is one."""
    eye = torch.zeros(*perms.shape, perms.shape[-1], dtype=dtype, device=perms.device)
    return eye.scatter_(-1, perms.unsqueeze(-1), 1.0)
