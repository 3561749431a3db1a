"""How much should the least-squares refit be damped, as a function of the calibration tokens per input?

For chosen decoder layers of a model (default: the offline SmolLM2-135M) and several calibration budgets,
every linear is pruned 2:4 with SparseGPT's mask (lsq's permutation), then refitted exactly (batched
Cholesky) on the calibration Gram matrix damped by each value of a grid, and scored on a held-out Gram
matrix from 64 windows of other text. Printed per linear: the grid's best damp, and how far above that
best the held-out error is under each way of choosing the damp without held-out text: a fixed 0.01 (the
default), the rules max(0.01, c * width / tokens), and `algorithms.refit.evidence_damp` (what lsq uses:
estimated per group from SparseGPT's update). A choice that stays within a few percent of the grid's best on
every layer and budget, on two models, needs no tuning per model.

Layer statistics are cached in `--stats-dir` (one file per model, layer, group and budget), so a second run
only repeats the solves.

    OMP_NUM_THREADS=1 python research/refit_damping.py --layers 3 15 27 --budgets 4 16 64
    OMP_NUM_THREADS=1 python research/refit_damping.py --model gemma-3-270m --layers 2 9 15
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from gram_mask_headroom import layer_groups
from optimum_permllm.algorithms.heuristic_permutation import heuristic_permutation
from optimum_permllm.algorithms.refit import DampedGram, damped_gram, evidence_damp
from optimum_permllm.algorithms.scores import obs_feature_weights
from optimum_permllm.algorithms.sparsegpt import sparsegpt_prune

GRID = (0.001, 0.01, 0.03, 0.1, 0.3, 1.0)
RULES = (0.5, 1.0)


def exact_refit(w: torch.Tensor, gram_damped: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Every row's kept weights solved exactly on the damped Gram matrix (batched Cholesky, same count per row)."""
    rows = w.shape[0]
    kept = keep.nonzero()[:, 1].view(rows, -1)
    target = (w @ gram_damped).gather(1, kept)
    out = torch.zeros_like(w)
    for start in range(0, rows, 256):
        idx = kept[start:start + 256]
        lower = torch.linalg.cholesky(gram_damped[idx.unsqueeze(2), idx.unsqueeze(1)])
        out[start:start + 256].scatter_(1, idx, torch.cholesky_solve(target[start:start + 256].unsqueeze(2), lower).squeeze(2))
    return out


def relative_error(w: torch.Tensor, new: torch.Tensor, gram: torch.Tensor) -> float:
    d = w - new
    return float((d * (d @ gram)).sum() / (w * (w @ gram)).sum())


def at_damp(errors: dict[float, float], damp: float) -> float:
    """The held-out error at `damp`, interpolated on the grid in log(damp)."""
    xs = [math.log(g) for g in GRID]
    x = math.log(min(max(damp, GRID[0]), GRID[-1]))
    for (x0, g0), (x1, g1) in zip(zip(xs, GRID), zip(xs[1:], GRID[1:])):
        if x0 <= x <= x1:
            t = (x - x0) / (x1 - x0)
            return errors[g0] * (1 - t) + errors[g1] * t
    return errors[GRID[-1]]


def cached_groups(args, budget: int | None) -> dict:
    """{layer: [(names, weights, Gram matrix, tokens)]} for `budget` calibration windows (None: the held-out
    64 windows), read from `--stats-dir` when there, captured (and saved) otherwise."""
    tag = (args.model or "smollm2-135m").replace("/", "_")
    path = Path(args.stats_dir, f"{tag}_{'heldout' if budget is None else budget}_{args.seq_len}_{args.seed}.pt")
    if path.exists():
        return torch.load(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_permllm.data.assets import resolve_model
    from optimum_permllm.data.calibration import get_calibration_data, get_evaluation_text

    source = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    text, windows, seed = ([get_evaluation_text()], 64, 0) if budget is None else (None, budget, args.seed)
    samples = get_calibration_data(text, tokenizer, windows, args.seq_len, seed=seed)
    groups = {layer: [(names, ws, stats.gram(), stats.num_tokens) for names, ws, stats in found]
              for layer, found in layer_groups(model, samples, set(args.layers)).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(groups, path)
    return groups


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 15, 27])
    ap.add_argument("--budgets", type=int, nargs="+", default=[4, 16, 64], help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stats-dir", default="runs/layer-stats")
    args = ap.parse_args()
    heldout = cached_groups(args, None)
    excess: dict[str, list[float]] = {}
    for budget in args.budgets:
        calibration = cached_groups(args, budget)
        for layer in args.layers:
            for (names, ws, g, tokens), (_, _, gh, _) in zip(calibration[layer], heldout[layer]):
                obs = obs_feature_weights(DampedGram.from_gram(g, 0.01))
                perm = heuristic_permutation(torch.cat(ws).abs() * obs, 2, 4)
                gp, ghp = g[perm][:, perm], gh[perm][:, perm]
                pruned = [sparsegpt_prune(w[:, perm], 2 * gp, 2, 4, damp=0.01) for w in ws]
                stacked_updates, stacked_keeps = (torch.cat(parts) for parts in zip(*pruned))
                evidence = evidence_damp(torch.cat(ws)[:, perm], stacked_updates, stacked_keeps, gp, tokens)
                for name, w, (_, keep) in zip(names, ws, pruned):
                    wp = w[:, perm]
                    errors = {d: relative_error(wp, exact_refit(wp, damped_gram(gp, d), keep), ghp) for d in GRID}
                    best = min(errors.values())
                    choices = {"0.01": 0.01, **{f"c={c}": max(0.01, c * wp.shape[1] / tokens) for c in RULES},
                               "evidence": max(0.01, evidence)}
                    row = {"layer": layer, "linear": name.split(".")[-1], "width": wp.shape[1], "tokens": tokens,
                           "best_damp": min(errors, key=errors.get), "evidence_damp": round(evidence, 4),
                           "no_refit": round(relative_error(wp, wp * keep, ghp), 5),
                           "errors": {str(d): round(e, 5) for d, e in errors.items()},
                           "excess_percent": {k: round(100 * (at_damp(errors, d) / best - 1), 2) for k, d in choices.items()}}
                    for key, value in row["excess_percent"].items():
                        excess.setdefault(key, []).append(value)
                    print(json.dumps(row), flush=True)
    print(json.dumps({"summary": {k: {"mean": round(sum(v) / len(v), 2), "max": round(max(v), 2)} for k, v in excess.items()}}))


if __name__ == "__main__":
    main()
