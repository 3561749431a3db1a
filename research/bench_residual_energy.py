"""How much of the residual stream's energy sits in its few largest dimensions (massive activations).

A cosine or squared-error objective on a decoder layer's output is dominated by those dimensions; this
prints, for every few decoder layers, the share of the mean squared hidden state held by the top-k
dimensions. Example (the figure in research/FINDINGS.md):

    python research/bench_residual_energy.py --samples 2 --seq-len 256 --top 4
"""

from __future__ import annotations

import argparse

import torch


def main(argv=None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_permllm.data.assets import smollm2_model_dir
    from optimum_permllm.data.calibration import get_calibration_data

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model id or folder (default: the offline SmolLM2-135M)")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--top", type=int, default=4)
    parser.add_argument("--every", type=int, default=4, help="report every n-th layer")
    args = parser.parse_args(argv)
    source = args.model or str(smollm2_model_dir())
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    ids = get_calibration_data(None, AutoTokenizer.from_pretrained(source), args.samples, args.seq_len)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    print(f"| after layer | top-{args.top} dims | share of energy |\n|---|---|---|")
    for index in range(args.every, len(hidden), args.every):
        energy = hidden[index].flatten(0, 1).float().pow(2).mean(0)
        top = energy.topk(args.top)
        print(f"| {index} | {top.indices.tolist()} | {float(top.values.sum() / energy.sum()):.3f} |")


if __name__ == "__main__":
    main()
