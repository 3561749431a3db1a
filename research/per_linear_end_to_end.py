"""End to end: does giving some linears their own input permutation lower perplexity?

`research/per_linear_headroom.py` measured, per layer group, that one heuristic permutation per linear
lowers q/k/v's held-out output error by 6-8% on top of the Gram mask. This script measures what that is
worth for the whole model: it runs `benchmarks/bench_pruning.py`'s one-method path in this process with
the plan's `own_permutation` set, so that every linear named in `--split` is planned as a group of its own
(its own heuristic or learned permutation on its own scores; the others keep sharing one). The split
linears keep distinct permutations, so the fold into the norm is skipped and each gathers its input at
run time: the perplexity is what a folded per-linear structure would give, the speed is not.

    OMP_NUM_THREADS=1 python research/per_linear_end_to_end.py --split q_proj k_proj v_proj \
        --methods lsq+cp --num-samples 64 --seed 0 --jsonl per_linear.jsonl

Rows are labelled "METHOD, own permutation: NAMES" so that `benchmarks/seed_summary.py` can pair them with
the shared-permutation rows of the same seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_pruning  # noqa: E402

from optimum_permllm.data.calibration import get_calibration_data  # noqa: E402
from optimum_permllm.pipeline.layerwise import sparsify_layerwise  # noqa: E402


def prune_with_own_permutations(own: list[str]):
    """`bench_pruning.run_one`'s prune step: the config's plan with `own` planned as groups of their own."""

    def prune(model, tokenizer, config) -> None:
        plan = dataclasses.replace(config.to_plan(), own_permutation=tuple(own))
        samples = get_calibration_data(config.dataset, tokenizer, config.num_samples, config.seq_len, config.seed)
        sparsify_layerwise(model, samples, plan, progress=False, callback=_print_first_groups)

    return prune


def _print_first_groups(index: int, info: dict) -> None:
    if index == 0:
        print(f"layer 0 groups: {list(info['groups'])}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", nargs="+", required=True, metavar="NAME", help="linears that get their own permutation")
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--jsonl", default=None)
    args, rest = parser.parse_known_args()
    for method in args.methods:
        row = bench_pruning.run_one(bench_pruning.build_parser().parse_args(["--one", method] + rest),
                                    prune=prune_with_own_permutations(args.split))
        row["method"] = f"{method}, own permutation: {' '.join(args.split)}"
        print(json.dumps(row), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as handle:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
