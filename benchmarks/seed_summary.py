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


def by_setting(rows: list[dict], value: str = "perplexity") -> dict[tuple, dict[int, float]]:
    """{(method, sparsity, num_samples, linears left dense): {seed: value}}; a repeated seed keeps its last row,
    rows without `value` (e.g. older runs without kl_to_dense) are left out."""
    table: dict[tuple, dict[int, float]] = defaultdict(dict)
    for row in rows:
        if value not in row:
            continue
        key = (_label(row), row.get("sparsity", "-"), row.get("num_samples"), " ".join(row.get("keep_dense") or []) or "-")
        table[key][int(row.get("seed", 0))] = float(row[value])
    return table


def _label(row: dict) -> str:
    """The row's method, with the joint training's settings where they were recorded (rows of the same method
    with other settings are other methods), e.g. "wanda+learned-model (last 6, standardised, 32 steps)"."""
    joint = row.get("joint") or {}
    parts = [f"last {row['learned_layers']}" if row.get("learned_layers") else None, row.get("joint_loss"),
             f"{joint['steps']} steps" if "steps" in joint else None]
    parts = [part for part in parts if part]
    return row["method"] + (f" ({', '.join(parts)})" if parts else "")


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


def summary(rows: list[dict], reference: str | None, value: str = "perplexity") -> str:
    """The Markdown table of `value` (a bench_pruning.py row field: perplexity, kl_to_dense, ...)."""
    table = by_setting(rows, value)
    _fmt = _formatter(value)
    lines = [f"| method | sparsity | samples | left dense | {value} per seed | mean +/- sd | vs reference (same seeds) | lower on |",
             "|---|---|---|---|---|---|---|---|"]
    for (method, sparsity, samples, dense), seeds in sorted(table.items(), key=lambda item: str(item[0])):
        per_seed = ", ".join(f"s{s}: {_fmt(seeds[s])}" for s in sorted(seeds))
        mean, sd = mean_sd(list(seeds.values()))
        versus, lower = "-", "-"
        ref = table.get((reference or method.partition("+")[0] + "+cp", sparsity, samples, dense))
        if ref is not None and ref is not seeds:
            count, diff, error, wins = paired(seeds, ref)
            if count:
                spread = f" +/- {_fmt(error)}" if count > 1 else ""
                versus = f"{'+' if diff >= 0 else ''}{_fmt(diff)}{spread} ({count} seed{'s' if count > 1 else ''})"
                lower = f"{wins}/{count}"
        lines.append(f"| {method} | {sparsity} | {samples} | {dense} | {per_seed} | {_fmt(mean)} +/- {_fmt(sd)} | {versus} | {lower} |")
    return "\n".join(lines)


def _formatter(value: str):
    """Two decimals for perplexities; four for the other fields (a KL divergence in nats is about 1)."""
    digits = 2 if value == "perplexity" else 4
    return lambda number: f"{number:.{digits}f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jsonl", nargs="+", help="files written by bench_pruning.py --jsonl")
    parser.add_argument("--reference", default=None, help="method every other one is paired with (default: METRIC+cp of each method's own metric)")
    parser.add_argument("--value", default="perplexity", help="the row field to compare (e.g. kl_to_dense); lower is better")
    args = parser.parse_args(argv)
    print(summary(load_rows(args.jsonl), args.reference, args.value))


if __name__ == "__main__":
    main()
