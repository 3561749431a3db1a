"""What `metric="lsq"` costs per linear group, part by part, against SparseGPT, and what a 7B prune would take.

For each group of linears sharing an input (q/k/v, o, gate/up, down) the group is planned twice with the
library's own `plan_group` and the heuristic permutation: once with `metric="sparsegpt"`, once with
`metric="lsq"`. The plan records the seconds of each of its parts (the damped Gram matrix and its inverse,
the heuristic permutation, SparseGPT, the Gram-chosen mask, the refit) and the refit's iterations and rows
stopped at the cap; the script prints them per group, after one untimed warm-up run.

Sources of Gram matrices, stated in every row:
- `real`: a decoder layer of a real model (`--model`, default the offline SmolLM2-135M), dense inputs of
  `--num-samples` x `--seq-len` calibration tokens (the middle layer unless `--layer`);
- `synthetic`: shapes no offline model has (LLaMA-7B: hidden 4096, MLP 11008; a wide 0.5B model: hidden
  896, MLP 4864). Their Gram matrix has a power-law spectrum (eigenvalue i proportional to 1/i), random
  eigenvectors and log-normal input scales with 1% outlier inputs 20x larger, with the damping lsq would
  use for `--tokens` calibration tokens; weights are Gaussian. Rows are subsampled to `--rows` (every
  part but the matrix factorisations is linear in the rows); times are scaled back to the full rows.

`--wide-model` also prunes, through the public API, a randomly initialised Qwen2-shaped model wider than both
real models (hidden 896, MLP 4864, 14 heads on 2 KV heads, the shapes of a 0.5B model, `--wide-layers` decoder
layers, SmolLM2's tokenizer and vocabulary) with SparseGPT + heuristic and lsq + heuristic on `--num-samples`
x `--seq-len` tokens of the offline text, and prints both prune times (its accuracy means nothing).

The 7B projection adds, per decoder layer, the two forward passes the pipeline runs over the calibration
tokens (statistics, then the pruned outputs), timed on one LLaMA-7B-shaped layer and scaled to 128 x 2048
tokens, to the sum of the four groups' planning times.

    python benchmarks/bench_lsq_cost.py                                   # SmolLM2 middle layer + synthetic shapes
    python benchmarks/bench_lsq_cost.py --model gemma-3-270m --synthetic  # a second real model only
    python benchmarks/bench_lsq_cost.py --real --synthetic llama7b --rows 512 --device cuda
    python benchmarks/bench_lsq_cost.py --wide-model --num-samples 32          # whole prunes of a wider model
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

SYNTHETIC = {  # name -> (hidden, mlp)
    "llama7b": (4096, 11008),
    "wide": (896, 4864),
}
TOKENS_7B = 128 * 2048


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.wide_model:
        print(json.dumps(wide_model_prunes(args)), flush=True)
        return
    rows = []
    if args.real or not args.synthetic:
        rows += [_run_group(*group, args) for group in real_groups(args)]
    for name in args.synthetic or ():
        rows += [_run_group(*group, args) for group in synthetic_groups(name, args)]
    for row in rows:
        print(json.dumps(row), flush=True)
    if "llama7b" in (args.synthetic or ()):
        print(json.dumps(project_7b([r for r in rows if r["source"].startswith("synthetic llama7b")], args)), flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a real model: short name, Hub id or folder (default SmolLM2)")
    parser.add_argument("--real", action="store_true", help="also the real model when --synthetic is given")
    parser.add_argument("--layer", type=int, default=None, help="decoder layer of the real model (default: middle)")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--synthetic", nargs="*", choices=sorted(SYNTHETIC), default=None)
    parser.add_argument("--tokens", type=int, default=None,
                        help="calibration tokens the synthetic damping assumes (default: 128 x 2048 for llama7b, "
                             "32 x 512 for wide)")
    parser.add_argument("--rows", type=int, default=0, help="rows kept per synthetic linear (0: all; fewer: scaled up)")
    parser.add_argument("--wide-model", action="store_true", help="whole prunes of a random wide Qwen2 (see above)")
    parser.add_argument("--wide-layers", type=int, default=4)
    parser.add_argument("--sparsity", default="2:4")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    return parser


def real_groups(args):
    """(source, names, weights, statistics) of every group of one decoder layer of a real model, dense inputs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_permllm.data.assets import resolve_model
    from optimum_permllm.data.calibration import get_calibration_data
    from optimum_permllm.pipeline.capture import capture
    from optimum_permllm.pipeline.statistics import collect_statistics
    from optimum_permllm.pipeline.structure import find_decoder_layers, layer_linears

    source = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    _, layers = find_decoder_layers(model)
    wanted = len(layers) // 2 if args.layer is None else args.layer
    samples = get_calibration_data(None, tokenizer, args.num_samples, args.seq_len, seed=0)
    cache = capture(model, layers, samples, 1, "cpu")
    with torch.no_grad():
        for index in range(wanted):
            cache.hidden = [cache.call_for(index, h).run(layers[index], h) for h in cache.hidden]
        linears = layer_linears(layers[wanted])
        stats, groups = collect_statistics(layers[wanted], wanted, cache, linears, True)
    label = f"real {getattr(model.config, 'model_type', 'model')} layer {wanted}, {args.num_samples} x {args.seq_len} tokens"
    for group in groups:
        weights = {name: linears[name].weight.detach().float().clone() for name in group}
        yield label, group, _to(weights, args.device), _stats_to(stats[group[0]], args.device), 1.0


def synthetic_groups(name: str, args):
    """The four groups of a decoder layer of `name`'s shape, with synthetic Gram matrices (see the docstring)."""
    hidden, mlp = SYNTHETIC[name]
    tokens = args.tokens or (TOKENS_7B if name == "llama7b" else 32 * 512)
    shapes = [(("q_proj", "k_proj", "v_proj"), (hidden,) * 3, hidden), (("o_proj",), (hidden,), hidden),
              (("gate_proj", "up_proj"), (mlp, mlp), hidden), (("down_proj",), (hidden,), mlp)]
    gen = torch.Generator().manual_seed(0)
    grams = {}
    for names, outs, width in shapes:
        if width not in grams:
            grams[width] = synthetic_gram(width, gen)
        kept = [min(out, args.rows) if args.rows else out for out in outs]
        weights = {n: torch.randn(k, width, generator=gen) / math.sqrt(width) for n, k in zip(names, kept)}
        source = f"synthetic {name}, damping for {tokens} tokens"
        scale = sum(outs) / sum(kept)
        yield source, list(names), _to(weights, args.device), _stats_to(_statistics(grams[width], tokens), args.device), scale


def synthetic_gram(width: int, gen: torch.Generator) -> torch.Tensor:
    """A [width, width] Gram matrix: power-law spectrum, random eigenvectors, log-normal scales, 1% outliers."""
    q, _ = torch.linalg.qr(torch.randn(width, width, generator=gen))
    spectrum = 1.0 / torch.arange(1, width + 1, dtype=torch.float32)
    correlation = (q * spectrum) @ q.T
    d = torch.diagonal(correlation).rsqrt()
    correlation = correlation * d.unsqueeze(0) * d.unsqueeze(1)
    scales = torch.exp(torch.randn(width, generator=gen))
    scales[torch.randperm(width, generator=gen)[: max(1, width // 100)]] *= 20
    return correlation * scales.unsqueeze(0) * scales.unsqueeze(1)


def _statistics(gram: torch.Tensor, tokens: int):
    """InputStatistics whose Gram matrix is `gram` over `tokens` tokens."""
    from optimum_permllm.algorithms.statistics import InputStatistics

    stats = InputStatistics(gram.shape[0], track_gram=True)
    stats.gram_sum, stats.sum_squares, stats.num_tokens = gram * tokens, torch.diagonal(gram) * tokens, tokens
    return stats


def _to(weights: dict, device: str) -> dict:
    return {name: w.to(device) for name, w in weights.items()}


def _stats_to(stats, device: str):
    stats.sum_squares = stats.sum_squares.to(device)
    stats.gram_sum = stats.gram_sum.to(device)
    return stats


def wide_model_prunes(args) -> dict:
    """Prune seconds of SparseGPT + heuristic and lsq + heuristic on a random wide Qwen2 (public API)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from optimum_permllm import PermLLMConfig, PermLLMSparsifier
    from optimum_permllm.data.assets import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    config = Qwen2Config(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                         num_hidden_layers=args.wide_layers, vocab_size=len(tokenizer), tie_word_embeddings=True)
    row = {"model": f"random Qwen2, hidden 896, MLP 4864, {args.wide_layers} layers",
           "calibration": f"{args.num_samples} x {args.seq_len}", "threads": torch.get_num_threads(), "seconds": {}}
    for metric in ("sparsegpt", "lsq"):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).eval()
        sparsifier = PermLLMSparsifier(PermLLMConfig(sparsity=args.sparsity, metric=metric, permutation="heuristic",
                                                     num_samples=args.num_samples, seq_len=args.seq_len))
        start = time.perf_counter()
        sparsifier.sparsify_model(model, tokenizer, progress=False)
        row["seconds"][metric] = round(time.perf_counter() - start, 1)
    row["seconds_per_layer"] = {k: round(v / args.wide_layers, 1) for k, v in row["seconds"].items()}
    row["lsq_over_sparsegpt"] = round(row["seconds"]["lsq"] / row["seconds"]["sparsegpt"], 2)
    return row


def _run_group(source: str, names, weights: dict, stats, row_scale: float, args) -> dict:
    """Plan the group with SparseGPT and with lsq, each timed by part; seconds scaled to the full rows."""
    from optimum_permllm import PermLLMConfig
    from optimum_permllm.pipeline.planning import plan_group

    row = {"source": source, "group": "+".join(names), "shape": [[int(w.shape[0] * row_scale), w.shape[1]] for w in weights.values()],
           "tokens": stats.num_tokens, "device": args.device}
    for metric in ("sparsegpt", "lsq"):
        plan = PermLLMConfig(sparsity=args.sparsity, metric=metric, permutation="heuristic").to_plan()
        plan_group(weights, stats, plan)  # warm-up (allocations, BLAS threads)
        _sync(args.device)
        start = time.perf_counter()
        result = plan_group(weights, stats, plan)
        _sync(args.device)
        total = time.perf_counter() - start
        parts = result.info["seconds"]
        row[metric] = {"seconds": round(total * row_scale, 2),
                       "parts": {k: round(v * (1 if k == "gram_inverse" else row_scale), 2) for k, v in parts.items()}}
        if metric == "lsq":
            row[metric]["damp"] = round(result.info["damp"], 4)
            row[metric]["refit"] = result.info["refit"]
    row["lsq_over_sparsegpt"] = round(row["lsq"]["seconds"] / row["sparsegpt"]["seconds"], 2)
    return row


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def project_7b(rows: list[dict], args) -> dict:
    """Seconds per LLaMA-7B decoder layer and for 32 layers, SparseGPT vs lsq, with the forward passes."""
    forward = _forward_seconds_per_token(args.device) * TOKENS_7B * 2
    planning = {metric: sum(r[metric]["seconds"] for r in rows) for metric in ("sparsegpt", "lsq")}
    per_layer = {metric: round(planning[metric] + forward, 1) for metric in planning}
    return {"projection": "LLaMA-2 7B, 32 decoder layers, 128 x 2048 calibration tokens", "device": args.device,
            "threads": torch.get_num_threads(), "forward_passes_seconds_per_layer": round(forward, 1),
            "planning_seconds_per_layer": {k: round(v, 1) for k, v in planning.items()},
            "seconds_per_layer": per_layer, "hours_32_layers": {k: round(32 * v / 3600, 2) for k, v in per_layer.items()},
            "lsq_over_sparsegpt": round(per_layer["lsq"] / per_layer["sparsegpt"], 2)}


def _forward_seconds_per_token(device: str, tokens: int = 2048) -> float:
    """Seconds per token of one LLaMA-7B-shaped decoder layer's forward pass (random weights, fp32)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    with torch.device(device):
        layer, rotary = LlamaDecoderLayer(config, 0).eval(), LlamaRotaryEmbedding(config)
        hidden = torch.randn(1, tokens, 4096)
        positions = torch.arange(tokens).unsqueeze(0)
    embeddings = rotary(hidden, positions)
    with torch.no_grad():
        layer(hidden, position_embeddings=embeddings)  # warm-up
        _sync(device)
        start = time.perf_counter()
        layer(hidden, position_embeddings=embeddings)
        _sync(device)
    return (time.perf_counter() - start) / tokens


if __name__ == "__main__":
    main()
