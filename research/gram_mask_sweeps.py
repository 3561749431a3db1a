"""What each coordinate-descent sweep of the Gram mask costs and buys, per layer group (issue 31).

For every group of linears sharing an input in a few decoder layers, the Gram mask is run from Wanda's mask
after the heuristic permutation, as `metric="gram"` runs it (one call per group, mu = 0.3), and after each
sweep the script records: the rows the sweep visited and moved, its seconds, and the group's relative output
error on the calibration Gram matrix and on a held-out one (other text). The held-out error after k sweeps
against after all of them is what stopping earlier would cost; the rows still moving say whether the
descent has converged.

    OMP_NUM_THREADS=1 python research/gram_mask_sweeps.py --layers 3 15 27 --num-samples 64
    OMP_NUM_THREADS=1 python research/gram_mask_sweeps.py --model gemma-3-270m --layers 2 9 15
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gram_mask_headroom import errors, group_parser, paired_groups, wanda_keeps  # noqa: E402

from optimum_permllm.algorithms import gram_mask as gram_mask_module  # noqa: E402
from optimum_permllm.pipeline.permutations import heuristic_order  # noqa: E402
from optimum_permllm.sparse.nm import NMPattern  # noqa: E402


def traced_descent(weights, gram, start, n, m, sweeps):
    """Yield (k, the k-th sweep's {visited, moved, seconds} or None if the descent stopped before it, the mask
    after a budget of k sweeps) for k = 1..sweeps; each budget is a fresh run, as the library would run it."""
    real_sweep = gram_mask_module._sweep
    trace = []

    def timed_sweep(w, *rest):
        began = time.perf_counter()
        current, moved = real_sweep(w, *rest)
        trace.append({"visited": w.shape[0], "moved": int(moved.sum()), "seconds": time.perf_counter() - began})
        return current, moved

    gram_mask_module._sweep = timed_sweep
    try:
        for k in range(1, sweeps + 1):
            trace.clear()
            keep = gram_mask_module.gram_mask(weights, gram, start, n, m, sweeps=k)
            yield k, (trace[-1] if len(trace) == k else None), keep
    finally:
        gram_mask_module._sweep = real_sweep


def main() -> None:
    ap = group_parser(__doc__.splitlines()[0])
    ap.add_argument("--sweeps", type=int, default=gram_mask_module.DEFAULT_SWEEPS)
    args = ap.parse_args()
    torch.manual_seed(0)
    pattern = NMPattern(2, 4)
    for layer, names, ws, stats, stats_ho in paired_groups(args):
        g, g_ho, norms = stats.gram(), stats_ho.gram(), stats.feature_norms()
        scores = torch.cat([w.abs() * norms for w in ws])
        perm = heuristic_order(scores, pattern)
        starts = wanda_keeps(ws, norms, perm, 2, 4)
        stacked, start = torch.cat([w[:, perm] for w in ws]), torch.cat(starts)
        rows = [w.shape[0] for w in ws]
        start_cal, start_ho, _ = errors(ws, perm, starts, g, g_ho)
        out = {"layer": layer, "group": "+".join(names), "rows": sum(rows), "width": stacked.shape[1],
               "wanda": {"cal": start_cal, "heldout": start_ho}, "sweeps": []}
        for k, step, keep in traced_descent(stacked, g[perm][:, perm], start, 2, 4, args.sweeps):
            cal, ho, _ = errors(ws, perm, list(keep.split(rows)), g, g_ho)
            out["sweeps"].append({"k": k, "cal": cal, "heldout": ho,
                                  **({"visited": step["visited"], "moved": step["moved"],
                                      "seconds": round(step["seconds"], 3)} if step else {"stopped": True})})
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
