"""How much should the least-squares refit be damped, as a function of the calibration tokens per input?

For chosen decoder layers of a model (default: the offline SmolLM2-135M) and several calibration budgets,
every linear is pruned 2:4 with SparseGPT's mask (lsq's permutation), then refitted exactly (batched
Cholesky) on the calibration Gram matrix damped by each value of a grid, and scored on a held-out Gram
matrix from 64 windows of other text. Printed per linear: the grid's best damp, and how far above that
best the held-out error is at damp 0.01 and under the rule damp = max(0.01, c * width / tokens) for a few c.
A rule that stays within a few percent of the grid's best on every layer and budget, on two models, needs
no tuning per model.

    OMP_NUM_THREADS=1 python research/refit_damping.py --layers 3 15 27 --budgets 4 16 64
    OMP_NUM_THREADS=1 python research/refit_damping.py --model gemma-3-270m --layers 2 9 15
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from gram_mask_headroom import layer_groups
from optimum_permllm.algorithms.heuristic_permutation import heuristic_permutation
from optimum_permllm.algorithms.refit import DampedGram, damped_gram
from optimum_permllm.algorithms.scores import obs_feature_weights
from optimum_permllm.algorithms.sparsegpt import sparsegpt_prune

GRID = (0.001, 0.01, 0.03, 0.1, 0.3, 1.0)
RULES = (0.5, 1.0, 2.0)


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


def load(model_source: str | None, num_samples: int, seq_len: int, layers: set[int], seed: int, heldout: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_permllm.data.assets import resolve_model
    from optimum_permllm.data.calibration import get_calibration_data, get_evaluation_text

    source = resolve_model(model_source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    text = [get_evaluation_text()] if heldout else None
    return layer_groups(model, get_calibration_data(text, tokenizer, num_samples, seq_len, seed=seed), layers)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 15, 27])
    ap.add_argument("--budgets", type=int, nargs="+", default=[4, 16, 64], help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    layers = set(args.layers)
    heldout = load(args.model, 64, args.seq_len, layers, 0, heldout=True)
    excess = {"0.01": [], **{f"c={c}": [] for c in RULES}}
    for budget in args.budgets:
        calibration = load(args.model, budget, args.seq_len, layers, args.seed, heldout=False)
        for layer in args.layers:
            for (names, ws, stats), (_, _, stats_ho) in zip(calibration[layer], heldout[layer]):
                g, gh, tokens = stats.gram(), stats_ho.gram(), stats.num_tokens
                obs = obs_feature_weights(DampedGram.from_gram(g, 0.01))
                perm = heuristic_permutation(torch.cat(ws).abs() * obs, 2, 4)
                gp, ghp = g[perm][:, perm], gh[perm][:, perm]
                for name, w in zip(names, ws):
                    wp = w[:, perm]
                    _, keep = sparsegpt_prune(wp, 2 * gp, 2, 4, damp=0.01)
                    errors = {d: relative_error(wp, exact_refit(wp, damped_gram(gp, d), keep), ghp) for d in GRID}
                    best = min(errors.values())
                    row = {"layer": layer, "linear": name.split(".")[-1], "width": wp.shape[1], "tokens": tokens,
                           "best_damp": min(errors, key=errors.get), "no_refit": round(relative_error(wp, wp * keep, ghp), 5),
                           "errors": {str(d): round(e, 5) for d, e in errors.items()}}
                    row["excess_percent"] = {"0.01": round(100 * (errors[0.01] / best - 1), 2)}
                    for c in RULES:
                        row["excess_percent"][f"c={c}"] = round(100 * (at_damp(errors, max(0.01, c * wp.shape[1] / tokens)) / best - 1), 2)
                    for key, value in row["excess_percent"].items():
                        excess[key].append(value)
                    print(json.dumps(row), flush=True)
    print(json.dumps({"summary": {k: {"mean": round(sum(v) / len(v), 2), "max": round(max(v), 2)} for k, v in excess.items()}}))


if __name__ == "__main__":
    main()
