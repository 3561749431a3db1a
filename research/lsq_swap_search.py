"""Room above the heuristic permutation for `lsq`: greedy channel swaps scored on the refitted error.

`swap_scan.py` showed that, with the Gram-chosen mask and no weight update, no single channel swap lowers a
group's error from the heuristic permutation. `lsq` refits the kept weights, so its objective differs:
this script measures whether a permutation search on THAT objective has room. Start: the group as
`metric="lsq"` plans it (OBS-chosen heuristic permutation; per row SparseGPT's or the Gram-chosen mask,
whichever refits lower). Candidate move: swap one channel of N:M group a with one of group b (random),
re-choose both groups' masks in every row (once by the Gram objective without update, once by the OBS
block cost w_P^T ([G^-1]_PP)^-1 w_P, the other groups' masks kept), refit every row on both and keep
each row's lower (as `lsq` does). A move is kept if the calibration error of the group falls.

Errors: relative output error after the refit, mean over the group's linears, on the calibration Gram
matrix and on a held-out one (64 x 512 tokens each by default).

    OMP_NUM_THREADS=1 python research/lsq_swap_search.py --layers 15 --groups o_proj --seconds 600
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gram_mask_headroom import group_parser, paired_groups  # noqa: E402

from optimum_permllm import PermLLMConfig  # noqa: E402
from optimum_permllm.algorithms.gram_mask import DEFAULT_MU, keep_options, robust_gram  # noqa: E402
from optimum_permllm.algorithms.refit import damped_gram, refit_best_of, row_output_errors  # noqa: E402
from optimum_permllm.pipeline.planning import plan_group  # noqa: E402


def refitted(ws, g, perm, keeps, damp):
    """Each member refitted in `perm` order: per row the better of its candidate masks. -> (weights, masks)."""
    gp = g[perm][:, perm]
    out = [refit_best_of(w[:, perm], gp, list(candidates), damp=damp) for w, candidates in zip(ws, keeps)]
    return [new for new, _ in out], [mask for _, mask in out]


def relative_error(ws, perm, news, g):
    """Mean over members of ||X (W - W')||^2 / ||X W||^2 on Gram matrix g, weights in `perm` order."""
    gp = g[perm][:, perm]
    total = 0.0
    for w, new in zip(ws, news):
        wp = w[:, perm]
        total += float(row_output_errors(wp - new, gp).sum() / row_output_errors(wp, gp).sum())
    return total / len(ws)


def rechoose(mask, cols, options, costs_of):
    """`mask` with each row's keep pattern over `cols` (two N:M groups) replaced by the cheapest of the
    `options` [K, 2M] under `costs_of(options) -> [rows, K]`."""
    best = costs_of(options).argmin(1)
    new = mask.clone()
    new[:, cols] = options[best]
    return new


def gram_costs(wp, mask, cols, gp):
    """Cost of each option on `cols` for every row, no update: the Gram error with the other groups' pruning fixed."""
    d = wp.masked_fill(mask, 0)
    d[:, cols] = 0
    p = d @ gp[:, cols]  # [rows, 8]: cross terms with the rest of the row's pruned weights
    g_cc = gp[cols][:, cols]

    def costs(options):
        dropped = wp[:, cols].unsqueeze(1) * (~options).float()  # [rows, K, 8]
        return 2 * (dropped * p.unsqueeze(1)).sum(-1) + ((dropped @ g_cc) * dropped).sum(-1)

    return costs


def obs_costs(wp, cols, h):
    """OBS block cost of each option on `cols` for every row: w_P^T ([G^-1]_PP)^-1 w_P over the pruned P."""
    h_cc = h[cols][:, cols]

    def costs(options):
        out = []
        for keep in options:
            pruned = (~keep).nonzero().flatten()
            wpr = wp[:, cols][:, pruned]
            out.append(((wpr @ torch.linalg.inv(h_cc[pruned][:, pruned])) * wpr).sum(-1))
        return torch.stack(out, 1)

    return costs


def search(ws, g_cal, g_ho, perm, masks, n, m, damp, seconds, seed=0):
    """Greedy random channel swaps kept when the calibration error falls; returns the log."""
    gen = torch.Generator().manual_seed(seed)
    single = keep_options(n, m)
    options = torch.stack([torch.cat([a, b]) for a, b in itertools.product(single, single)])  # [K^2, 2M]
    robust = robust_gram(g_cal, DEFAULT_MU)
    inverse = torch.linalg.inv(damped_gram(g_cal, damp))  # permuting G permutes its inverse the same way
    groups = perm.numel() // m
    news, masks = refitted(ws, g_cal, perm, [[k] for k in masks], damp)
    start = best = relative_error(ws, perm, news, g_cal)
    start_ho = relative_error(ws, perm, news, g_ho)
    tried = kept = 0
    closest = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        a, b = torch.randperm(groups, generator=gen)[:2].tolist()
        i, j = torch.randint(m, (2,), generator=gen).tolist()
        cand = perm.clone()
        cand[a * m + i], cand[b * m + j] = perm[b * m + j], perm[a * m + i]
        cols = torch.cat([torch.arange(a * m, a * m + m), torch.arange(b * m, b * m + m)])
        gp, h = robust[cand][:, cand], inverse[cand][:, cand]
        candidates = []
        for w, mask in zip(ws, masks):
            wp = w[:, cand]
            candidates.append([rechoose(mask, cols, options, gram_costs(wp, mask, cols, gp)),
                               rechoose(mask, cols, options, obs_costs(wp, cols, h))])
        cand_news, cand_masks = refitted(ws, g_cal, cand, candidates, damp)
        error = relative_error(ws, cand, cand_news, g_cal)
        tried += 1
        if error >= best:
            closest = min(closest, error / best - 1)
        else:
            perm, masks, news, best, kept = cand, cand_masks, cand_news, error, kept + 1
    return {"start_cal": round(start, 6), "start_heldout": round(start_ho, 6), "end_cal": round(best, 6),
            "end_heldout": round(relative_error(ws, perm, news, g_ho), 6), "swaps_tried": tried,
            "swaps_kept": kept, "closest_rejected_change": round(closest, 6) if tried > kept else None}


def main():
    parser = group_parser(__doc__.splitlines()[0], layers=(15,))
    parser.add_argument("--groups", nargs="+", default=["o_proj"], help="first linear of each group (suffix)")
    parser.add_argument("--seconds", type=float, default=600, help="search time per group")
    args = parser.parse_args()
    plan = PermLLMConfig(metric="lsq", permutation="heuristic").to_plan()
    for layer, names, ws, stats, stats_ho in paired_groups(args):
        if not any(names[0].endswith(g) for g in args.groups):
            continue
        start = time.perf_counter()
        group_plan = plan_group(dict(zip(names, ws)), stats, plan)
        ws = [w.detach().float() for w in ws]
        result = search(ws, stats.gram(), stats_ho.gram(), group_plan.perm, [group_plan.masks[n] for n in names],
                        plan.pattern.n, plan.pattern.m, plan.damp, args.seconds)
        print(json.dumps({"layer": layer, "group": "+".join(names), **result,
                          "seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
