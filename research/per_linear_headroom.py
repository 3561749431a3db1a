"""Does one permutation per linear (q, k, v and gate, up each their own) still pay on top of the Gram mask?

For every group of linears sharing an input (q/k/v, gate/up) in a few decoder layers, every way of
splitting the group's members into blocks that each share one input permutation is scored: from one
permutation for the whole group ("q+k+v", today's structure) to one per linear ("q|k|v"), with mixes
such as "q+k|v". Each block's permutation is the heuristic one on its members' Wanda scores |W| * feature
norms, with the same LSA block rule as `pipeline.permutations.heuristic`; each member is then pruned 2:4 in
its block's order with Wanda's mask and with the Gram mask (mu = 0.3 by default). Scores: relative output
error tr(D G D^T) / tr(W G W^T), mean over the members, as [calibration, held-out, held-out diagonal part]
(`gram_mask_headroom.layer_groups` gives the two Gram matrices); "member/x" is member x's held-out error
under the shared permutation and under its own.

    OMP_NUM_THREADS=1 python research/per_linear_headroom.py --layers 3 15 27 --num-samples 64
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gram_mask_headroom import errors, gram_keeps, group_parser, paired_groups, wanda_keeps  # noqa: E402

from optimum_permllm.algorithms.gram_mask import DEFAULT_MU  # noqa: E402
from optimum_permllm.algorithms.heuristic_permutation import heuristic_permutation  # noqa: E402
from optimum_permllm.pipeline.permutations import LSA_BLOCK  # noqa: E402


def heuristic_perm(ws, norms, n, m):
    """The heuristic permutation shared by `ws` on their Wanda scores, as `plan_group` chooses it."""
    groups = ws[0].shape[1] // m
    scores = torch.cat([w.abs() * norms for w in ws])
    return heuristic_permutation(scores, n, m, max_groups_per_lsa=LSA_BLOCK if groups > 4 * LSA_BLOCK else None)


def partitions(items):
    """Every way of splitting `items` (a tuple) into non-empty blocks, as tuples of tuples."""
    if len(items) <= 1:
        yield (items,) if items else ()
        return
    first, rest = items[0], items[1:]
    for part in partitions(rest):
        yield ((first,),) + part
        for i in range(len(part)):
            yield part[:i] + ((first,) + part[i],) + part[i + 1:]


def member_errors(ws, norms, g, gh, n, m, mu):
    """{mask: {(block, member): (cal, held-out, held-out diagonal)}}: every member's errors under the
    heuristic permutation of every block (subset of the members) it can belong to."""
    out = {"wanda": {}, f"gram{mu}": {}}
    for size in range(1, len(ws) + 1):
        for block in itertools.combinations(range(len(ws)), size):
            perm = heuristic_perm([ws[i] for i in block], norms, n, m)
            for i in block:
                w = [ws[i]]
                out["wanda"][block, i] = errors(w, perm, wanda_keeps(w, norms, perm, n, m), g, gh)
                out[f"gram{mu}"][block, i] = errors(w, perm, gram_keeps(w, g, norms, perm, n, m, mu), g, gh)
    return out


def main():
    ap = group_parser(__doc__.splitlines()[0])
    ap.add_argument("--mu", type=float, default=DEFAULT_MU)
    args = ap.parse_args()
    n, m, mu = 2, 4, args.mu
    for layer, names, ws, stats, stats_ho in paired_groups(args):
        if len(ws) < 2:
            continue
        short = [x.split(".")[-1].removesuffix("_proj") for x in names]
        errs = member_errors(ws, stats.feature_norms(), stats.gram(), stats_ho.gram(), n, m, mu)
        row = {"layer": layer, "group": "+".join(x.split(".")[-1] for x in names)}
        for mask, by_member in errs.items():
            for part in partitions(tuple(range(len(ws)))):
                label = "|".join("+".join(short[i] for i in block) for block in part)
                values = [by_member[block, i] for block in part for i in block]
                row[f"{mask}/{label}"] = [round(sum(v[k] for v in values) / len(ws), 5) for k in range(3)]
            for i, name in enumerate(short):  # each member's held-out error: shared vs its own permutation
                row[f"{mask}/member/{name}"] = [by_member[tuple(range(len(ws))), i][1], by_member[(i,), i][1]]
        print(json.dumps(row), flush=True)

if __name__ == "__main__":
    main()
