"""Accuracy and cost of every pruning method on one model: perplexity, zero-shot, wall time, peak memory.

Each method runs in its own process (so peak memory is its own) and prints one JSON line; the driver
collects them into a Markdown table. Example (the figures in BENCHMARKS.md):

    python benchmarks/bench_pruning.py --methods dense magnitude wanda wanda+cp sparsegpt+cp \
        --sparsity 2:4 --eval-windows 24 --zero-shot-limit 0

`--model gemma-3-270m` runs the same on Gemma 3 270M (any Hub id or folder works too).
A method is METRIC[+cp|+learned[-ot][-model]] ("dense" for the unpruned model), e.g. "ria+cp",
"sparsegpt+learned" or "wanda+learned-ot-model" ("-model": the joint training of PermLLM as published;
`--learned-layers 6` learns only the last 6 layers, `--joint-batch` sets its windows per step, `--joint-loss`
its loss, and the row records the joint training's held-out losses and seconds per step).
Protocol (fixed, documented in BENCHMARKS.md): fp32 on the CPU; calibration = the offline Wikipedia
calibration part, `--num-samples` windows of `--seq-len` tokens, seed 0; perplexity = the first
`--eval-windows` non-overlapping 512-token windows of the held-out Wikipedia part, and on the same
tokens the KL divergence from the dense model's next-token distribution (nats/token).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time

from optimum_permllm.options import MODEL_HELP


def parse_method(method: str) -> dict:
    """'wanda+cp' -> PermLLMConfig keyword arguments."""
    if method == "dense":
        return {}
    metric, _, perm = method.partition("+")
    kind, *options = perm.split("-")  # e.g. learned-ot-model
    unknown = [part for part in options if part not in ("ot", "layer", "model")] if kind == "learned" else options
    if kind not in ("", "cp", "learned") or unknown:
        raise ValueError(f"Unknown method {method!r}: write METRIC[+cp|+learned[-ot][-layer|-model]], e.g. wanda+cp.")
    kwargs = {"metric": metric, "permutation": {"": "none", "cp": "heuristic", "learned": "learned"}[kind]}
    if kind == "learned":
        kwargs["learner"] = "ot" if "ot" in options else "sinkhorn"
        kwargs.update({"scope": part for part in options if part in ("layer", "model")})
    return kwargs


def run_one(args, prune=None) -> dict:
    """Prune and evaluate one method in this process; returns its row. `prune(model, tokenizer, config)` prunes
    the model in place (default: `PermLLMSparsifier(config).sparsify_model`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_permllm import PermLLMConfig, PermLLMSparsifier
    from optimum_permllm.data.assets import resolve_model
    from optimum_permllm.evaluation.perplexity import kl_divergence, perplexity

    torch.manual_seed(0)
    source = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval().to(args.device)
    row = {"method": args.one, "sparsity": args.sparsity if args.one != "dense" else "-", "model": source,
           "seed": args.seed, "num_samples": args.num_samples, "device": args.device,
           "dataset": args.dataset or "offline Wikipedia"}
    if args.keep_dense:
        row["keep_dense"] = args.keep_dense
    dense = copy.deepcopy(model) if args.one != "dense" else model
    start = time.perf_counter()
    if args.one != "dense":
        config = PermLLMConfig(sparsity=args.sparsity, num_samples=args.num_samples, seq_len=args.seq_len,
                               dataset=args.dataset, steps=args.steps, seed=args.seed, learned_layers=args.learned_layers,
                               modules_to_not_convert=args.keep_dense, **parse_method(args.one))
        if prune is not None:
            prune(model, tokenizer, config)
        elif config.permutation == "learned" and config.scope == "model":
            row.update(prune_joint(model, tokenizer, config, args.joint_batch, args.joint_loss))
        else:
            PermLLMSparsifier(config).sparsify_model(model, tokenizer, progress=False)
    row["prune_seconds"] = round(time.perf_counter() - start, 1)
    row["perplexity"] = round(perplexity(model, tokenizer, seq_len=512, max_windows=args.eval_windows), 3)
    row["kl_to_dense"] = round(kl_divergence(model, dense, tokenizer, seq_len=512, max_windows=args.eval_windows), 4)
    if args.zero_shot_limit:
        from optimum_permllm.evaluation.zeroshot import zero_shot

        row["zero_shot"] = {k: round(v * 100, 1) for k, v in zero_shot(model, tokenizer, limit=args.zero_shot_limit).items()}
    row["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return row


def prune_joint(model, tokenizer, config, batch: int | None, loss: str | None) -> dict:
    """Prune with the `model` scope through the pipeline (the sparsifier's path, with the joint training's batch
    and loss set); returns what the joint training reports, for the row."""
    from dataclasses import replace

    from optimum_permllm.data.calibration import get_calibration_data
    from optimum_permllm.pipeline.layerwise import sparsify_layerwise

    plan = config.to_plan()
    if batch is not None:
        plan = replace(plan, learning=replace(plan.learning, batch_size=batch, micro_batch=batch))
    if loss is not None:
        plan = replace(plan, learning=replace(plan.learning, standardise=loss == "standardised"))
    samples = get_calibration_data(config.dataset, tokenizer, config.num_samples, config.seq_len, config.seed)
    found = []
    sparsify_layerwise(model, samples, plan, progress=False, callback=lambda index, info: found.append(info.get("joint")))
    joint = next((info for info in found if info is not None), {})
    keep = ("first_layer", "steps", "train_windows", "heldout_windows", "start_loss", "best_loss", "best_step",
            "heldout_history", "seconds_per_step")
    return {"learned_layers": config.learned_layers, "joint_batch": plan.learning.batch_size,
            "joint_loss": "standardised" if plan.learning.standardise else "cosine",
            "joint": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in joint.items() if k in keep}}


def table(rows: list[dict]) -> str:
    """Markdown table of the rows, with the share of the Wanda gap closed where both ends are present."""
    dense = next((r["perplexity"] for r in rows if r["method"] == "dense"), None)
    wanda = next((r["perplexity"] for r in rows if r["method"] == "wanda"), None)
    lines = ["| method | sparsity | perplexity | gap to Wanda closed | zero-shot avg | prune time (s) | peak RSS (GB) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        closed = "-"
        if dense is not None and wanda is not None and r["method"] not in ("dense", "wanda") and wanda != dense:
            closed = f"{100 * (wanda - r['perplexity']) / (wanda - dense):.0f}%"
        zs = r.get("zero_shot", {}).get("average", "-")
        lines.append(f"| {r['method']} | {r['sparsity']} | {r['perplexity']:.2f} | {closed} | {zs} | "
                     f"{r['prune_seconds']} | {r['peak_rss_gb']} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The options of the driver and of one method's run (`--one METHOD`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["dense", "magnitude", "wanda", "wanda+cp", "ria", "ria+cp",
                                                          "sparsegpt", "sparsegpt+cp"])
    parser.add_argument("--sparsity", default="2:4")
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="calibration windows (and learned-permutation) seed")
    parser.add_argument("--steps", type=int, default=None, help="learned-permutation steps (None: default)")
    parser.add_argument("--learned-layers", type=int, default=None,
                        help="learned permutation: only the last N decoder layers learn (None: all)")
    parser.add_argument("--joint-batch", type=int, default=None,
                        help="-model methods: calibration windows per step of the joint training (None: 16)")
    parser.add_argument("--joint-loss", default=None, choices=["cosine", "standardised"],
                        help="-model methods: the cosine of the last hidden states as they are, or with every feature "
                             "divided by its dense RMS (None: the library's default)")
    parser.add_argument("--eval-windows", type=int, default=24)
    parser.add_argument("--device", default="cpu", help="where the model is pruned and evaluated (e.g. cuda)")
    parser.add_argument("--keep-dense", nargs="+", default=None, metavar="NAME",
                        help="linears left dense (name suffixes, e.g. q_proj k_proj): prune only the others")
    parser.add_argument("--zero-shot-limit", type=int, default=0, help="rows per zero-shot task (0: skip)")
    parser.add_argument("--jsonl", default=None, help="append each row to this file")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args)), flush=True)
        return
    rows = []
    for method in args.methods:
        command = [sys.executable, __file__, "--one", method] + _forward(argv if argv is not None else sys.argv[1:])
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"{method}: FAILED\n{result.stderr[-2000:]}", file=sys.stderr)
            continue
        row = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as handle:
                handle.write(json.dumps(row) + "\n")
    print(table(rows))


def _forward(argv: list[str]) -> list[str]:
    """The driver's options minus --methods, passed on to each method's process."""
    out, skip = [], False
    for token in argv:
        if token == "--methods":
            skip = True
            continue
        if skip and token.startswith("--"):
            skip = False
        if not skip:
            out.append(token)
    return out


if __name__ == "__main__":
    main()
