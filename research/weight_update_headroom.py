"""How much does an exact weight update add, and on which mask, per layer group?

For a few decoder layers (default: the offline SmolLM2-135M, dense calibration inputs), every group of
linears sharing an input is pruned 2:4 after the heuristic permutation in several ways, each scored by
the relative output error on the calibration Gram matrix and on a held-out one (mean over the group's
linears): SparseGPT as the library runs it; SparseGPT's mask with its kept weights refitted exactly
(`algorithms.refit.refit_kept`); Wanda's and the Gram-chosen mask refitted the same way; for a few
dampenings of the refit. The OBS-chosen permutation and the per-row choice of mask are in
`obs_permutation_headroom.py`.

    OMP_NUM_THREADS=1 python research/weight_update_headroom.py --layers 3 15 27 --num-samples 64
"""

from __future__ import annotations

import json
import time

import torch

from gram_mask_headroom import errors, gram_keeps, group_parser, paired_groups, wanda_keeps
from optimum_permllm import PermLLMConfig
from optimum_permllm.algorithms.refit import refit_kept
from optimum_permllm.algorithms.sparsegpt import sparsegpt_prune
from optimum_permllm.pipeline.planning import plan_group


def update_errors(ws, perm, news, g_cal, g_ho):
    """(calibration, held-out) relative errors of updated weights `news` (permuted order), mean over members."""
    out = []
    for g in (g_cal, g_ho):
        gp = g[perm][:, perm]
        total = 0.0
        for w, new in zip(ws, news):
            wp = w[:, perm]
            d = wp - new
            total += float((d * (d @ gp)).sum() / (wp * (wp @ gp)).sum())
        out.append(round(total / len(ws), 5))
    return tuple(out)


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, round(time.perf_counter() - start, 2)


def main():
    ap = group_parser(__doc__.splitlines()[0])
    ap.add_argument("--damps", type=float, nargs="+", default=[0.01, 0.1])
    args = ap.parse_args()
    n, m = 2, 4
    for layer, names, ws, stats, stats_ho in paired_groups(args):
        g, gh, norms, h = stats.gram(), stats_ho.gram(), stats.feature_norms(), stats.hessian()
        weights = dict(zip(names, ws))
        perm = plan_group(weights, stats, PermLLMConfig(metric="wanda", permutation="heuristic").to_plan()).perm
        gp = g[perm][:, perm]
        row = {"layer": layer, "group": "+".join(x.split(".")[-1] for x in names)}
        sgpt, row["t_sparsegpt"] = timed(lambda: [sparsegpt_prune(w, h, n, m, perm=perm) for w in ws])
        row["sparsegpt"] = update_errors(ws, perm, [s[0] for s in sgpt], g, gh)
        masks = {"sparsegpt": [s[1] for s in sgpt], "wanda": wanda_keeps(ws, norms, perm, n, m),
                 "gram0.3": gram_keeps(ws, g, norms, perm, n, m, 0.3), "gram0": gram_keeps(ws, g, norms, perm, n, m, 0.0)}
        for mname, keeps in masks.items():
            row[f"{mname}/none"] = errors(ws, perm, keeps, g, gh)[:2]
            for damp in args.damps:
                news, t = timed(lambda: [refit_kept(w[:, perm], gp, k, damp) for w, k in zip(ws, keeps)])
                row[f"{mname}/refit{damp}"] = update_errors(ws, perm, news, g, gh)
                row[f"t_refit{damp}_{mname}"] = t
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
