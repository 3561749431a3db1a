"""Wall time of the learned permutation on LLaMA-7B-shaped decoder layers (issue 4's speed target).

Random weights and random token ids are enough for timing: a LlamaForCausalLM with hidden 4096, MLP 11008
and 32 heads (the 7B shapes) is pruned with PermLLMConfig(permutation="learned") at its defaults, one
decoder layer at a time through the library's own pipeline, and the seconds of every layer are printed
(calibration capture excluded). The target is at most 60 s per layer on one H100:

    python benchmarks/bench_learned_layer_time.py --device cuda                      # 2 layers, 128 x 2048 tokens
    python benchmarks/bench_learned_layer_time.py --hidden 512 --mlp 1376 --heads 8 --num-samples 4 --seq-len 128
"""

from __future__ import annotations

import argparse
import json
import time

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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--mlp", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers to prune (the first warms up)")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--sparsity", default="2:4")
    parser.add_argument("--learner", default="sinkhorn", choices=["sinkhorn", "ot"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    from optimum_permllm import PermLLMConfig
    from optimum_permllm.pipeline.layerwise import sparsify_layerwise

    model = build_model(args.hidden, args.mlp, args.heads, args.layers, 1024, args.device)
    samples = torch.randint(0, 1024, (args.num_samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    config = PermLLMConfig(sparsity=args.sparsity, permutation="learned", learner=args.learner,
                           num_samples=args.num_samples, seq_len=args.seq_len)
    seconds = []
    start = time.perf_counter()
    sparsify_layerwise(model, samples, config.to_plan(), callback=lambda index, info: seconds.append(round(info["seconds"], 1)))
    total = time.perf_counter() - start
    report = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "threads": torch.get_num_threads(), "shape": f"hidden {args.hidden}, mlp {args.mlp}, {args.heads} heads",
              "calibration": f"{args.num_samples} x {args.seq_len}", "sparsity": args.sparsity, "learner": args.learner,
              "seconds_per_layer": seconds, "total_seconds_with_capture": round(total, 1)}
    if args.device.startswith("cuda"):
        report["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
