"""Does a permutation chosen on SparseGPT's OBS saliency help SparseGPT and the least-squares refit?

For a few decoder layers (default: the offline SmolLM2-135M, dense calibration inputs), every group of
linears sharing an input gets two heuristic permutations: the library's, chosen on Wanda scores
|w| ||x_j||, and one chosen on the OBS saliency |w| / sqrt([H^-1]_jj) (H the damped Hessian; the square of
this score is the error of pruning w alone with the optimal update of the others). Each is then pruned
2:4 by SparseGPT and by `metric="lsq"` (SparseGPT's mask, kept weights refitted); each row's error is
also taken as the lower of lsq and the Gram-chosen mask refitted (chosen per row on calibration), to see
what a per-row choice of mask before the refit would add. Scored as in `weight_update_headroom.py`.

    OMP_NUM_THREADS=1 python research/obs_permutation_headroom.py --layers 3 15 27 --num-samples 64
"""

from __future__ import annotations

import json
import time

import torch

from gram_mask_headroom import gram_keeps, group_parser, paired_groups
from optimum_permllm.algorithms.heuristic_permutation import heuristic_permutation
from optimum_permllm.algorithms.refit import refit_kept, row_output_errors
from optimum_permllm.algorithms.scores import obs_feature_weights
from optimum_permllm.algorithms.sparsegpt import sparsegpt_prune
from weight_update_headroom import update_errors

DAMP = 0.01


def per_row_best(ws, perm, candidates, g_cal, g_ho):
    """(calibration, held-out) relative errors when each row takes the candidate lowest on calibration,
    and the share of rows that took the last candidate."""
    out, choice = [0.0, 0.0], []
    for k, w in enumerate(ws):
        wp = w[:, perm]
        grams = [g[perm][:, perm] for g in (g_cal, g_ho)]
        errs = [torch.stack([row_output_errors(wp - c[k], gp) for c in candidates]) for gp in grams]  # [K, rows]
        pick = errs[0].argmin(0)
        choice.append(pick.float().mean().item())
        for i, gp in enumerate(grams):
            out[i] += float(errs[i].gather(0, pick[None]).sum() / (wp * (wp @ gp)).sum())
    return tuple(round(v / len(ws), 5) for v in out), round(sum(choice) / len(choice), 3)


def main():
    ap = group_parser(__doc__.splitlines()[0])
    args = ap.parse_args()
    n, m = 2, 4
    for layer, names, ws, stats, stats_ho in paired_groups(args):
        g, gh, norms, h = stats.gram(), stats_ho.gram(), stats.feature_norms(), stats.hessian()
        row = {"layer": layer, "group": "+".join(x.split(".")[-1] for x in names)}
        start = time.perf_counter()
        obs = torch.cat(ws).abs() * obs_feature_weights(g, DAMP)
        perms = {"wanda": heuristic_permutation(torch.cat([w.abs() * norms for w in ws]), n, m),
                 "obs": heuristic_permutation(obs, n, m)}
        row["t_obs_perm"] = round(time.perf_counter() - start, 2)
        for pname, perm in perms.items():
            gp = g[perm][:, perm]
            sgpt = [sparsegpt_prune(w, h, n, m, perm=perm, damp=DAMP) for w in ws]
            lsq = [refit_kept(w[:, perm], gp, keep, DAMP) for w, (_, keep) in zip(ws, sgpt)]
            gram = [refit_kept(w[:, perm], gp, keep, DAMP) for w, keep in zip(ws, gram_keeps(ws, g, norms, perm, n, m, 0.3))]
            row[f"{pname}/sparsegpt"] = update_errors(ws, perm, [s[0] for s in sgpt], g, gh)
            row[f"{pname}/lsq"] = update_errors(ws, perm, lsq, g, gh)
            row[f"{pname}/gram-refit"] = update_errors(ws, perm, gram, g, gh)
            row[f"{pname}/per-row-best"], row[f"{pname}/gram-share"] = per_row_best(ws, perm, [lsq, gram], g, gh)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
