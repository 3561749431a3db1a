"""Does the library's conjugate-gradient refit reach the exact least-squares solution on real layers?

For each linear of the chosen decoder layers (default: the offline SmolLM2-135M, dense calibration
inputs, heuristic permutation, SparseGPT's 2:4 mask), compares `algorithms.refit.refit_kept` against an
exact batched Cholesky solve of the same damped systems: calibration and held-out relative error, time.

    OMP_NUM_THREADS=1 python research/refit_solver_check.py --layers 15 --num-samples 64
"""

from __future__ import annotations

import json
import time

import torch

from gram_mask_headroom import group_parser, paired_groups
from optimum_permllm.algorithms.heuristic_permutation import heuristic_permutation
from optimum_permllm.algorithms.refit import damped_gram, refit_kept
from optimum_permllm.algorithms.sparsegpt import sparsegpt_prune


def exact_refit(w: torch.Tensor, g: torch.Tensor, keep: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The reference: every row's damped normal equations solved by Cholesky (same kept count per row)."""
    gd = damped_gram(g, damp)
    rows = w.shape[0]
    kept = keep.nonzero()[:, 1].view(rows, -1)
    target = (w @ gd).gather(1, kept)
    out = torch.zeros_like(w)
    for start in range(0, rows, 128):
        idx = kept[start:start + 128]
        lower = torch.linalg.cholesky(gd[idx.unsqueeze(2), idx.unsqueeze(1)])
        out[start:start + 128].scatter_(1, idx, torch.cholesky_solve(target[start:start + 128].unsqueeze(2), lower).squeeze(2))
    return out


def relative_error(w, new, g):
    d = w - new
    return round(float((d * (d @ g)).sum() / (w * (w @ g)).sum()), 5)


def main():
    args = group_parser(__doc__.splitlines()[0], layers=(15,)).parse_args()
    for layer, names, ws, stats, stats_ho in paired_groups(args):
        g, gh = stats.gram(), stats_ho.gram()
        perm = heuristic_permutation(torch.cat(ws).abs() * stats.feature_norms(), 2, 4)
        gp, ghp = g[perm][:, perm], gh[perm][:, perm]
        for name, w in zip(names, ws):
            wp = w[:, perm]
            _, keep = sparsegpt_prune(wp, gp, 2, 4)
            row = {"layer": layer, "linear": name.split(".")[-1]}
            for solver, fn in (("cg", refit_kept), ("cholesky", exact_refit)):
                start = time.perf_counter()
                new = fn(wp, gp, keep)
                row[solver] = {"seconds": round(time.perf_counter() - start, 2), "calibration": relative_error(wp, new, gp),
                               "held_out": relative_error(wp, new, ghp)}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
