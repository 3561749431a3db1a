"""Wall time of the pruning methods on LLaMA-7B-shaped decoder layers: the learned permutation, the lsq refit,
the Gram mask, and a step of the joint training (issue 4's speed target: at most 60 s per layer for the learned
permutation on one H100).

Random weights and random token ids are enough for timing: a LlamaForCausalLM with hidden 4096, MLP 11008
and 32 heads (the 7B shapes) is pruned through the library's own pipeline, one decoder layer at a time, and
the seconds of every layer are printed (calibration capture excluded), one JSON line per method:

- learned: PermLLMConfig(permutation="learned") at its defaults (Wanda scores, Sinkhorn learner)
- lsq: PermLLMConfig(metric="lsq") (least-squares refit of the kept weights, heuristic permutation)
- gram: PermLLMConfig(metric="gram") (Gram-chosen mask, heuristic permutation)
- joint: PermLLMConfig(permutation="learned", scope="model") (PermLLM as published: every layer's permutations
  trained together), `--joint-steps` AdamW steps of `--joint-batch` windows; reported per step and per layer,
  the figure that sizes a whole run (steps x layers)

    python benchmarks/bench_learned_layer_time.py --device cuda --methods gram lsq learned  # 2 layers, 128 x 2048
    python benchmarks/bench_learned_layer_time.py --hidden 512 --mlp 1376 --heads 8 --num-samples 4 --seq-len 128
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch


def build_model(hidden: int, mlp: int, heads: int, layers: int, vocab: int, device: str):
    """A randomly initialised LLaMA-shaped causal LM in fp32 on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_attention_heads=heads,
                         num_key_value_heads=heads, num_hidden_layers=layers, vocab_size=vocab,
                         max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).eval()


METHODS = {
    "learned": dict(permutation="learned"),
    "lsq": dict(metric="lsq"),
    "gram": dict(metric="gram"),
    "joint": dict(permutation="learned", scope="model"),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--mlp", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers to prune (the first warms up)")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--sparsity", default="2:4")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=["learned"],
                        help="what to time, in this order (one JSON line each, printed as it finishes)")
    parser.add_argument("--learner", default="sinkhorn", choices=["sinkhorn", "ot"], help="for learned")
    parser.add_argument("--steps", type=int, default=None, help="for learned: optimisation steps (default: the "
                        "method's; fewer only for smoke runs)")
    parser.add_argument("--joint-steps", type=int, default=8, help="for joint: optimisation steps timed")
    parser.add_argument("--joint-batch", type=int, default=16, help="for joint: windows per step (the paper's 16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    for method in args.methods:
        print(json.dumps(time_method(method, args)), flush=True)


def time_method(method: str, args) -> dict:
    """Prune a fresh random model with one method; the seconds of each layer and the run's totals."""
    from optimum_permllm import PermLLMConfig
    from optimum_permllm.pipeline.layerwise import sparsify_layerwise

    on_gpu = args.device.startswith("cuda")
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_model(args.hidden, args.mlp, args.heads, args.layers, 1024, args.device)
    samples = torch.randint(0, 1024, (args.num_samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    settings = METHODS[method]
    if method == "learned":
        settings = dict(settings, learner=args.learner, **({} if args.steps is None else {"steps": args.steps}))
    if method == "joint":
        settings = dict(settings, steps=args.joint_steps)
    config = PermLLMConfig(sparsity=args.sparsity, num_samples=args.num_samples, seq_len=args.seq_len, **settings)
    plan = config.to_plan()
    if method == "joint":
        plan = replace(plan, learning=replace(plan.learning, batch_size=args.joint_batch, micro_batch=args.joint_batch))
    seconds, joint = [], []
    start = time.perf_counter()

    def record(index, info):
        seconds.append(round(info["seconds"], 1))
        joint.extend([info["joint"]] if "joint" in info else [])

    sparsify_layerwise(model, samples, plan, progress=False, callback=record)
    total = time.perf_counter() - start
    report = {"method": method, "settings": settings,
              "device": torch.cuda.get_device_name() if on_gpu else "cpu",
              "threads": torch.get_num_threads(), "shape": f"hidden {args.hidden}, mlp {args.mlp}, {args.heads} heads",
              "calibration": f"{args.num_samples} x {args.seq_len}", "sparsity": args.sparsity,
              "seconds_per_layer": seconds, "total_seconds_with_capture": round(total, 1)}
    if joint:
        step = joint[0]["seconds_per_step"]
        report.update(joint_batch=plan.learning.batch_size, joint_steps=joint[0]["steps"],
                      seconds_per_step=round(step, 3), seconds_per_step_per_layer=round(step / joint[0]["layers"], 3))
    if on_gpu:
        report["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del model
    return report


if __name__ == "__main__":
    main()
