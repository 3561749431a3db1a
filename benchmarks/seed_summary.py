"""Compare pruning methods over calibration seeds, paired by seed, from bench_pruning.py --jsonl rows.

A pruned small model's perplexity moves by several percent with the calibration seed alone, so one
seed cannot order two methods whose difference is smaller than that. This prints, per method, the
perplexity at every seed, the mean and standard deviation, and the difference to a reference method
on the SAME seeds with its standard error (what a claim "A beats B" needs). By default every method
is paired with the heuristic permutation of its own metric (wanda+learned with wanda+cp, the learned
permutation's initialisation); `--reference` pairs all of them with one method instead.

    python benchmarks/seed_summary.py runs.jsonl [--reference sparsegpt+cp]
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict


def load_rows(paths: list[str]) -> list[dict]:
    """Every JSON row of the files; rows without a seed (older runs) count as seed 0."""
    rows = []
    for path in paths:
        with open(path) as handle:
            rows += [json.loads(line) for line in handle if line.strip()]
    return rows


def by_setting(rows: list[dict]) -> dict[tuple, dict[int, float]]:
    """{(method, sparsity, num_samples, linears left dense): {seed: perplexity}}; a repeated seed keeps its last row."""
    table: dict[tuple, dict[int, float]] = defaultdict(dict)
    for row in rows:
        key = (row["method"], row.get("sparsity", "-"), row.get("num_samples"), " ".join(row.get("keep_dense") or []) or "-")
        table[key][int(row.get("seed", 0))] = float(row["perplexity"])
    return table


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def paired(method: dict[int, float], reference: dict[int, float]) -> tuple[int, float, float, int]:
    """(seeds in common, mean difference method - reference, its standard error, seeds where method is lower)."""
    seeds = sorted(set(method) & set(reference))
    if not seeds:
        return 0, math.nan, math.nan, 0
    diffs = [method[s] - reference[s] for s in seeds]
    mean, sd = mean_sd(diffs)
    return len(seeds), mean, sd / math.sqrt(len(seeds)), sum(d < 0 for d in diffs)


def summary(rows: list[dict], reference: str | None) -> str:
    """The Markdown table."""
    table = by_setting(rows)
    lines = ["| method | sparsity | samples | left dense | perplexity per seed | mean +/- sd | vs reference (same seeds) | lower on |",
             "|---|---|---|---|---|---|---|---|"]
    for (method, sparsity, samples, dense), seeds in sorted(table.items(), key=lambda item: str(item[0])):
        per_seed = ", ".join(f"s{s}: {seeds[s]:.2f}" for s in sorted(seeds))
        mean, sd = mean_sd(list(seeds.values()))
        versus, lower = "-", "-"
        ref = table.get((reference or method.partition("+")[0] + "+cp", sparsity, samples, dense))
        if ref is not None and ref is not seeds:
            count, diff, error, wins = paired(seeds, ref)
            if count:
                spread = f" +/- {error:.2f}" if count > 1 else ""
                versus = f"{diff:+.2f}{spread} ({count} seed{'s' if count > 1 else ''})"
                lower = f"{wins}/{count}"
        lines.append(f"| {method} | {sparsity} | {samples} | {dense} | {per_seed} | {mean:.2f} +/- {sd:.2f} | {versus} | {lower} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jsonl", nargs="+", help="files written by bench_pruning.py --jsonl")
    parser.add_argument("--reference", default=None, help="method every other one is paired with (default: METRIC+cp of each method's own metric)")
    args = parser.parse_args(argv)
    print(summary(load_rows(args.jsonl), args.reference))


if __name__ == "__main__":
    main()
