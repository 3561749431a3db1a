"""Time and quality of the heuristic channel permutation on random score matrices.

    python benchmarks/bench_heuristic.py --shapes 1536x576 576x1536 12288x4096 4096x11008

Scores are |N(0,1)| per weight times a heavy-tailed per-channel factor (as Wanda scores are); the
table gives the wall time and the retained-score gain over the identity, with the assignment run over
all groups ("full") and over blocks of 256 groups ("blocks").
"""

from __future__ import annotations

import argparse
import time

import torch

from optimum_permllm.algorithms import heuristic_permutation, retained_score
from optimum_permllm.sparse import identity_permutation


def run(rows: int, cols: int, blocks: int | None, seed: int = 0) -> tuple[float, float]:
    generator = torch.Generator().manual_seed(seed)
    channel = torch.rand(cols, generator=generator).pow(4) * 10 + 0.1
    scores = torch.randn(rows, cols, generator=generator).abs() * channel
    start = time.perf_counter()
    perm = heuristic_permutation(scores, 2, 4, max_groups_per_lsa=blocks)
    seconds = time.perf_counter() - start
    base = retained_score(scores, identity_permutation(cols), 2, 4)
    return seconds, 100 * (retained_score(scores, perm, 2, 4) / base - 1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["1536x576", "576x1536"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print("| scores (rows x channels) | mode | time (s) | retained score gain over identity |")
    print("|---|---|---|---|")
    for shape in args.shapes:
        rows, cols = map(int, shape.split("x"))
        for mode, blocks in (("full", None), ("blocks of 256", 256)):
            if blocks and cols // 4 <= blocks:
                continue
            seconds, gain = run(rows, cols, blocks)
            print(f"| {shape} | {mode} | {seconds:.1f} | +{gain:.2f}% |", flush=True)


if __name__ == "__main__":
    main()
