"""End to end: does giving some linears their own input permutation lower perplexity?

`research/per_linear_headroom.py` measured, per layer group, that one heuristic permutation per linear
lowers q/k/v's held-out output error by 6-8% on top of the Gram mask. This script measures what that is
worth for the whole model: it runs `benchmarks/bench_pruning.py`'s one-method path in this process with
the pipeline's groups split, so that every linear named in `--split` is planned as a group of its own
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
import contextlib
import io
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_pruning  # noqa: E402

from optimum_permllm.pipeline import layerwise  # noqa: E402
from optimum_permllm.pipeline.statistics import collect_statistics  # noqa: E402
from optimum_permllm.pipeline.structure import _matches  # noqa: E402


def split_groups(groups: list[list[str]], own: list[str]) -> list[list[str]]:
    """Each member whose name ends with one of `own` becomes a group of its own; the rest stay together."""
    out = []
    for group in groups:
        alone = [name for name in group if _matches(name, own)]
        rest = [name for name in group if name not in alone]
        out += ([rest] if rest else []) + [[name] for name in alone]
    return out


def collect_split(own: list[str]):
    """`collect_statistics` with the groups split; every new group reads its former leader's statistics."""

    def collect(layer, index, cache, linears, track_gram):
        stats, groups = collect_statistics(layer, index, cache, linears, track_gram)
        leader = {name: group[0] for group in groups for name in group}
        split = split_groups(groups, own)
        stats = {group[0]: stats[leader[group[0]]] for group in split}
        if index == 0:
            print(f"layer 0 groups: {['+'.join(g) for g in split]}", file=sys.stderr, flush=True)
        return stats, split

    return collect


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", nargs="+", required=True, metavar="NAME", help="linears that get their own permutation")
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--jsonl", default=None)
    args, rest = parser.parse_known_args()
    layerwise.collect_statistics = collect_split(args.split)
    for method in args.methods:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            bench_pruning.main(["--one", method] + rest)
        row = json.loads(out.getvalue().strip().splitlines()[-1])
        row["method"] = f"{method}, own permutation: {' '.join(args.split)}"
        print(json.dumps(row), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as handle:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
