"""Does one permutation per linear (q, k, v and gate, up each their own) still pay on top of the Gram mask?

For every group of linears sharing an input (q/k/v, gate/up) in a few decoder layers, the group is
pruned 2:4 after (a) the group's one shared heuristic permutation and (b) one heuristic permutation per
member, each computed on that member's own Wanda scores |W| * feature norms with the same LSA block rule
as `pipeline.planning.plan_group`; each with Wanda's mask and with the Gram mask (mu = 0.3) chosen in
the member's own order. Scores: relative output error tr(D G D^T) / tr(W G W^T), mean over the members,
on the calibration Gram matrix and on a held-out one (`gram_mask_headroom.layer_groups`).

    OMP_NUM_THREADS=1 python research/per_linear_headroom.py --layers 3 15 27 --num-samples 64
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gram_mask_headroom import errors, gram_keeps, layer_groups, wanda_keeps  # noqa: E402

from optimum_permllm import PermLLMConfig  # noqa: E402
from optimum_permllm.algorithms.gram_mask import DEFAULT_MU  # noqa: E402
from optimum_permllm.algorithms.heuristic_permutation import heuristic_permutation  # noqa: E402
from optimum_permllm.data.calibration import get_calibration_data, get_evaluation_text  # noqa: E402
from optimum_permllm.pipeline.planning import LSA_BLOCK, plan_group  # noqa: E402


def own_permutation(w, norms, n, m):
    """The heuristic permutation of one linear on its own Wanda scores, with plan_group's LSA block rule."""
    groups = w.shape[1] // m
    return heuristic_permutation(w.abs() * norms, n, m, max_groups_per_lsa=LSA_BLOCK if groups > 4 * LSA_BLOCK else None)


def per_member_errors(ws, perms, keeps_fn, g, gh):
    """`errors` with each member in its own order: (cal, held-out, held-out diagonal), mean over members."""
    parts = [errors([w], p, keeps_fn(w, p), g, gh) for w, p in zip(ws, perms)]
    return tuple(round(sum(x[i] for x in parts) / len(parts), 5) for i in range(3))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 15, 27])
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mu", type=float, default=DEFAULT_MU)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_permllm.data.assets import smollm2_model_dir

    source = args.model or str(smollm2_model_dir())
    tok = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    wanted = set(args.layers)
    cal = layer_groups(model, get_calibration_data(None, tok, args.num_samples, args.seq_len, seed=args.seed), wanted)
    ho = layer_groups(model, get_calibration_data([get_evaluation_text()], tok, args.num_samples, args.seq_len,
                                                  seed=0), wanted)
    n, m, mu = 2, 4, args.mu
    plan = PermLLMConfig(metric="wanda", permutation="heuristic").to_plan()
    for layer in args.layers:
        for (names, ws, stats), (_, _, stats_ho) in zip(cal[layer], ho[layer]):
            if len(ws) < 2:
                continue
            g, gh, norms = stats.gram(), stats_ho.gram(), stats.feature_norms()
            shared = plan_group(dict(zip(names, ws)), stats, plan).perm
            own = [own_permutation(w, norms, n, m) for w in ws]
            row = {"layer": layer, "group": "+".join(x.split(".")[-1] for x in names),
                   "wanda/shared": errors(ws, shared, wanda_keeps(ws, norms, shared, n, m), g, gh),
                   "wanda/per-linear": per_member_errors(ws, own, lambda w, p: wanda_keeps([w], norms, p, n, m), g, gh),
                   f"gram{mu}/shared": errors(ws, shared, gram_keeps(ws, g, norms, shared, n, m, mu), g, gh),
                   f"gram{mu}/per-linear": per_member_errors(
                       ws, own, lambda w, p: gram_keeps([w], g, norms, p, n, m, mu), g, gh)}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
