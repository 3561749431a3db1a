"""How a learned permutation shares its gain among the linears of one group (q/k/v, gate/up) of SmolLM2.

For each group that several linears read, prints each member's share of the group's dense output energy
and its relative 2:4 output error under the heuristic and the learned permutation (the library's
`learn_permutation` default, with the chosen metric). It shows what the `layer` objective favours: with
a ratio of summed errors (an earlier form of the objective) the member with the largest outputs dominated, and the
learned permutation could trade v_proj's error for q_proj's. Example (the figures in research/FINDINGS.md):

    OMP_NUM_THREADS=1 python research/bench_member_errors.py --layers 3 15 27 --metric ria wanda

With PYTHONPATH set to a checkout of an older commit, the same table shows that version's learner.
"""

from __future__ import annotations

import argparse

import torch

from bench_learned_layers import GROUPS, collect, load_model

from optimum_permllm.algorithms.heuristic_permutation import heuristic_permutation
from optimum_permllm.algorithms.learned import LayerObjective, learn_permutation
from optimum_permllm.algorithms.scores import score_fn
from optimum_permllm.sparse.nm import nm_mask

MULTI_MEMBER = ("self_attn.q_proj", "mlp.gate_proj")


def pruned(weights, norms, perm, metric) -> list[torch.Tensor]:
    """The group's weights 2:4-pruned with `metric` scores in `perm` order, back in the original order."""
    out = []
    for w in weights:
        mask = nm_mask(score_fn(metric)(w, norms)[:, perm], 2, 4)
        restored = torch.empty_like(w)
        restored[:, perm] = w[:, perm].masked_fill(~mask, 0)
        out.append(restored)
    return out


def member_errors(weights, gram, norms, perm, metric) -> list[float]:
    """Relative output error of every member of the group."""
    return [float(LayerObjective([w], gram)([p])) for w, p in zip(weights, pruned(weights, norms, perm, metric))]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 15, 27])
    parser.add_argument("--metric", nargs="+", default=["ria", "wanda"], choices=["ria", "wanda"])
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, tokenizer = load_model()
    data = collect(model, tokenizer, args.layers, args.num_samples, args.seq_len)
    print("| metric | layer | group | member | share of output energy | heuristic | learned | change |")
    print("|---|---|---|---|---|---|---|---|")
    for metric in args.metric:
        for index in args.layers:
            for leader in MULTI_MEMBER:
                weights, gram, norms = data[index]["groups"][leader]
                scores = torch.cat([score_fn(metric)(w, norms) for w in weights])
                init = heuristic_permutation(scores, 2, 4)
                learned = learn_permutation(weights, gram, norms, 2, 4, metric=metric, init_perm=init).perm
                energies = [float(((w @ gram) * w).sum()) for w in weights]
                before = member_errors(weights, gram, norms, init, metric)
                after = member_errors(weights, gram, norms, learned, metric)
                names = [name.split(".")[-1] for name in GROUPS[leader]]
                for name, energy, b, a in zip(names, energies, before, after):
                    print(f"| {metric} | {index} | {leader.split('.')[-1]} | {name} | {energy / sum(energies):.3f} | "
                          f"{b:.5f} | {a:.5f} | {100 * (a - b) / b:+.1f}% |", flush=True)


if __name__ == "__main__":
    main()
