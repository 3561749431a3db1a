"""Where the pruning error of the residual writers (o_proj, down_proj) sits, heuristic vs learned permutation.

For SmolLM2's attention and MLP output projections (they add into the residual stream), the exact 2:4
(Wanda) output error is split by output row. Printed per group: the share of the dense output energy and
of the heuristic's error in the 4 highest-energy rows (the massive residual dimensions), and three error
measures for the heuristic and the learned permutation: plain (the `layer` objective), weighted by the
squared gain of the norm that next reads the residual (what the next layer sees), and the mean per-row
relative error. Example (the figures in research/FINDINGS.md):

    OMP_NUM_THREADS=1 python research/bench_error_rows.py --layers 3 15 27 --num-samples 16
"""

from __future__ import annotations

import argparse

import torch

from bench_learned_layers import collect, heuristic, load_model, wanda_pruned

from optimum_permllm.algorithms.learned import learn_permutation


def row_errors(weight, gram, norms, perm) -> torch.Tensor:
    """Exact output error of every row of the 2:4 Wanda-pruned `weight` with input permutation `perm`."""
    pruned_away = weight - wanda_pruned([weight], norms, perm)[0]
    return ((pruned_away @ gram) * pruned_away).sum(dim=1)


def next_norm_gains(model, index: int) -> dict[str, torch.Tensor]:
    """The gain vector of the norm that next reads the residual stream after each output projection."""
    layers = model.model.layers
    after_mlp = layers[index + 1].input_layernorm if index + 1 < len(layers) else model.model.norm
    return {"self_attn.o_proj": layers[index].post_attention_layernorm.weight.detach().float(),
            "mlp.down_proj": after_mlp.weight.detach().float()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 15, 27])
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args(argv)
    model, tokenizer = load_model()
    data = collect(model, tokenizer, args.layers, args.num_samples, args.seq_len)
    print("| layer | group | top-4 rows: share of output energy | share of heuristic error | error heuristic / learned "
          "| next-norm-weighted | per-row relative |")
    print("|---|---|---|---|---|---|---|")
    for index in args.layers:
        gains = next_norm_gains(model, index)
        for leader, gain in gains.items():
            weights, gram, norms = data[index]["groups"][leader]
            weight, g2 = weights[0].float(), gain ** 2
            init = heuristic(weights, norms)
            learned = learn_permutation([weight], gram, norms, 2, 4, init_perm=init).perm
            dense = ((weight @ gram) * weight).sum(dim=1)
            heur, lrn = row_errors(weight, gram, norms, init), row_errors(weight, gram, norms, learned)
            top = torch.argsort(dense, descending=True)[:4]
            cells = [f"{float(dense[top].sum() / dense.sum()):.2f}", f"{float(heur[top].sum() / heur.sum()):.2f}"]
            for weigh in (torch.ones_like(g2), g2):
                cells.append(" / ".join(f"{float((weigh * e).sum() / (weigh * dense).sum()):.5f}" for e in (heur, lrn)))
            cells.append(" / ".join(f"{float((e / dense).mean()):.5f}" for e in (heur, lrn)))
            print(f"| {index} | {leader.split('.')[-1]} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
