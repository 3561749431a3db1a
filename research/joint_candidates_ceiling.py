"""Could a better choice among the joint training's candidates help a metric that ships its own masks?

The joint training (`scope="model"`) scores its start (the heuristic permutation) and the hard permutations
it reaches at 8 points of the run on held-out calibration windows, under the score masks of its forward
pass, and keeps the best. `gram` and `lsq` then ship masks (and `lsq` refitted weights) of their own, and
with them the joint training did not beat the heuristic (BENCHMARKS.md, "Joint training"). This script
prunes the model once per candidate, that candidate's permutations fixed in the learned layers and the
metric's own masks and weights computed on them, and reads the benchmark's perplexity and KL to dense. The
best candidate is the ceiling of any rule that chooses among them (a selection loss of the metric's own
masks, for instance); if it is not below the start's (step 0, the heuristic), choosing better cannot help.

    OMP_NUM_THREADS=1 python research/joint_candidates_ceiling.py --method gram+learned-model \
        --learned-layers 6 --steps 32 --joint-batch 8 --joint-loss standardised --num-samples 64 --seed 0 \
        --jsonl candidates.jsonl

It first runs METRIC+cp (the reference), then the benchmark's own `METHOD` row (it trains and records every
candidate), then prunes each other candidate with the training replaced by its permutations: one prune and one
evaluation each. With one learned layer the step-0 candidate is METRIC+cp's model. With more, the start of every
learned layer after the first is the heuristic of a model whose earlier layers carry the score masks, not the
metric's own, so it can differ from METRIC+cp (this is what the training starts from and compares against).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_pruning  # noqa: E402

from optimum_permllm.pipeline import joint_training, layerwise  # noqa: E402

CANDIDATES: list[tuple[int, float, list]] = []  # (step, held-out loss, permutations per group) of the training
GROUPS: list = []  # the training's groups, in the order of its permutations
_PREPARE_GROUPS = joint_training.prepare_groups


class RecordingTracker(joint_training.BestTracker):
    """The training's best-candidate tracker, keeping a copy of every candidate it is shown."""

    def update(self, perms, loss: float, step: int | None = None) -> bool:
        CANDIDATES.append((step, loss, [p.detach().clone().cpu() for p in perms]))
        return super().update(perms, loss, step)


def recording_groups(*args, **kwargs):
    """`prepare_groups`, remembering the groups so that a candidate's permutations can be mapped to them."""
    GROUPS[:] = _PREPARE_GROUPS(*args, **kwargs)
    return GROUPS


def fixed_candidate(perms: list):
    """A stand-in for `learn_jointly` that trains nothing and returns `perms` as the learned permutations."""

    def learn(*args, **kwargs) -> joint_training.JointResult:
        table: dict[int, dict] = {}
        for group, perm in zip(GROUPS, perms):
            table.setdefault(group.layer, {})[group.names] = perm
        return joint_training.JointResult(table, {})

    return learn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, help="a joint-training method, e.g. gram+learned-model")
    parser.add_argument("--jsonl", default=None)
    args, rest = parser.parse_known_args()
    if not args.method.endswith("+learned-model"):
        parser.error("--method must be a joint-training method (METRIC+learned-model)")
    heuristic = args.method.replace("+learned-model", "+cp")
    rows = [_row(bench_pruning.run_one(bench_pruning.build_parser().parse_args(["--one", heuristic] + rest)), None,
                 None, False)]
    run_args = bench_pruning.build_parser().parse_args(["--one", args.method] + rest)
    joint_training.BestTracker, joint_training.prepare_groups = RecordingTracker, recording_groups
    trained = bench_pruning.run_one(run_args)
    shipped = trained["joint"]["best_step"]
    rows += [_row(trained, shipped, loss, True) for step, loss, _ in CANDIDATES if step == shipped]
    for step, loss, perms in list(CANDIDATES):
        if step != shipped:
            layerwise.learn_jointly = fixed_candidate(perms)
            rows.append(_row(bench_pruning.run_one(run_args), step, loss, False))
    for row in rows:
        print(json.dumps(row), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as handle:
                handle.write(json.dumps(row) + "\n")
    print(_table(rows))


def _row(run: dict, step: int | None, loss: float | None, shipped: bool) -> dict:
    """One candidate's figures (step None: the METRIC+cp reference)."""
    keep = ("method", "model", "sparsity", "seed", "num_samples", "learned_layers", "perplexity", "kl_to_dense",
            "prune_seconds")
    return {**{k: run[k] for k in keep if k in run}, "candidate_step": step, "candidate_heldout_loss": loss,
            "shipped": shipped}


def _table(rows: list[dict]) -> str:
    """The rows as a Markdown table, in the order they ran."""
    lines = ["| candidate step | held-out loss (score masks) | perplexity | KL to dense | shipped |", "|---|---|---|---|---|"]
    for r in rows:
        step = "heuristic (METRIC+cp)" if r["candidate_step"] is None else r["candidate_step"]
        loss = "-" if r["candidate_heldout_loss"] is None else f"{r['candidate_heldout_loss']:.6f}"
        lines.append(f"| {step} | {loss} | {r['perplexity']:.3f} | "
                     f"{r['kl_to_dense']:.4f} | {'yes' if r['shipped'] else ''} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
