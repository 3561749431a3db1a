"""The best single channel swap after heuristic permutation + Gram-chosen mask, found by scanning EVERY swap.

Each candidate swap (channel i of N:M group a with channel j of group b) is scored with both groups'
masks re-chosen exactly (2:4: all 36 pairs of masks) given the rest of every row. If even the best of all
C^2/2 swaps gains little, a permutation search on the joint objective has no room above the heuristic.

    OMP_NUM_THREADS=1 python research/swap_scan.py --layer 15 --group o_proj --num-samples 64
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from gram_mask_headroom import errors, gram_keeps, layer_groups
from optimum_permllm import PermLLMConfig
from optimum_permllm.algorithms.gram_mask import keep_options, robust_gram
from optimum_permllm.data.calibration import get_calibration_data, get_evaluation_text
from optimum_permllm.pipeline.planning import plan_group


@torch.no_grad()
def best_swap_gains(ws, g, perm, keeps, n, m, mu, chunk=48):
    """[groups] for each group a, the largest error decrease of any swap with a later group (and the total error)."""
    w = torch.cat(ws)[:, perm]
    keep = torch.cat(keeps)
    gp = robust_gram(g, mu)[perm][:, perm]
    d = w.masked_fill(keep, 0)
    p = d @ gp
    total = float((d * p).sum())
    opts = keep_options(n, m)
    pair = torch.stack([torch.cat([a, b]) for a, b in itertools.product(opts, opts)])
    dropped = (~pair).float()  # [K^2, 2m]
    groups = w.shape[1] // m
    best = torch.zeros(groups)
    sigmas = []
    for i, j in itertools.product(range(m), range(m)):
        s = torch.arange(2 * m)
        s[i], s[m + j] = m + j, i
        sigmas.append(s)
    for a in range(groups):
        for start in range(a + 1, groups, chunk):
            bs = torch.arange(start, min(start + chunk, groups))
            cols = torch.cat([torch.arange(a * m, a * m + m).expand(len(bs), m), bs[:, None] * m + torch.arange(m)], 1)
            g_ab = gp[cols[:, :, None], cols[:, None, :]]  # [B, 2m, 2m]
            d_old = d[:, cols].permute(1, 0, 2)  # [B, R, 2m]
            q = p[:, cols].permute(1, 0, 2) - d_old @ g_ab
            old = (2 * d_old * q + (d_old @ g_ab) * d_old).sum((1, 2))
            w_ab = w[:, cols].permute(1, 0, 2)
            for s in sigmas:
                g_s, q_s, w_s = g_ab[:, s][:, :, s], q[:, :, s], w_ab[:, :, s]
                d_new = w_s.unsqueeze(2) * dropped  # [B, R, K^2, 2m]
                cost = 2 * (d_new * q_s.unsqueeze(2)).sum(-1) + ((d_new @ g_s.unsqueeze(1)) * d_new).sum(-1)
                gain = old - cost.min(-1).values.sum(-1)
                best[a] = max(best[a], float(gain.max()))
    return best, total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--group", default="o_proj", help="the group's first linear (suffix)")
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--mu", type=float, default=0.0)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_permllm.data.assets import smollm2_model_dir

    source = str(smollm2_model_dir())
    tok = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    cal = layer_groups(model, get_calibration_data(None, tok, args.num_samples, 512, seed=0), {args.layer})
    names, ws, stats = next(x for x in cal[args.layer] if x[0][0].endswith(args.group))
    g, norms = stats.gram(), stats.feature_norms()
    heur = plan_group(dict(zip(names, ws)), stats, PermLLMConfig(metric="wanda", permutation="heuristic").to_plan()).perm
    keeps = gram_keeps(ws, g, norms, heur, 2, 4, args.mu)
    t = time.perf_counter()
    best, total = best_swap_gains(ws, g, heur, keeps, 2, 4, args.mu)
    print(json.dumps({"layer": args.layer, "group": args.group, "mu": args.mu, "error_sum": round(total, 4),
                      "best_single_swap_gain": round(float(best.max()), 6),
                      "best_gain_share": round(float(best.max()) / total, 6),
                      "sum_of_best_gain_per_group_share": round(float(best.clamp_min(0).sum()) / total, 5),
                      "groups_with_a_gain": int((best > 0).sum()), "groups": len(best),
                      "seconds": round(time.perf_counter() - t, 1)}), flush=True)


if __name__ == "__main__":
    main()
