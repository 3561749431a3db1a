"""What the load-time checkpoint checks cost, against the load itself, on SmolLM2-135M-Instruct (or `--model`).

    python benchmarks/bench_load_validation.py              # SmolLM2-135M-Instruct (offline copy), fp32, 2:4
    python benchmarks/bench_load_validation.py --model gemma-3-270m --repeat 5   # or a Hub id or folder

The model is pruned by magnitude with a random input permutation per layer (what is checked does not
depend on which weights are kept), saved, then loaded `--repeat` times. Reported: the median time of
`from_pretrained` (checks included), of the tensor checks alone run on the loaded model
(`sparse_module_problems`: permutations, N:M masks, finite values), and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from optimum_permllm.options import MODEL_HELP


def _seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure(source: str, sparsity: str, repeat: int) -> dict:
    from transformers import AutoModelForCausalLM

    import optimum_permllm
    from optimum_permllm import PermLLMConfig, PermutedSparseLinear
    from optimum_permllm.nn.validation import sparse_module_problems
    from optimum_permllm.pipeline.structure import prunable_linears, set_submodule

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    config = PermLLMConfig(sparsity=sparsity, metric="magnitude", permutation="none")
    generator = torch.Generator().manual_seed(0)
    for name, linear in prunable_linears(model).items():
        perm = torch.randperm(linear.in_features, generator=generator)
        set_submodule(model, name, PermutedSparseLinear.from_linear(linear, config.pattern.n, config.pattern.m, perm=perm))
    config.converted_modules = sorted(n for n, m in model.named_modules() if isinstance(m, PermutedSparseLinear))
    model.config.quantization_config = config
    with tempfile.TemporaryDirectory() as tmp:
        folder = optimum_permllm.save_pretrained(model, Path(tmp) / "sparse")
        AutoModelForCausalLM.from_pretrained(folder)  # warm the file cache
        loads = [_seconds(lambda: AutoModelForCausalLM.from_pretrained(folder)) for _ in range(repeat)]
        loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert sparse_module_problems(loaded) == []
    checks = [_seconds(lambda: sparse_module_problems(loaded)) for _ in range(repeat)]
    return {"layers": len(config.converted_modules), "load_s": statistics.median(loads),
            "checks_s": statistics.median(checks), "threads": torch.get_num_threads()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--sparsity", default="2:4")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    from optimum_permllm.data.assets import resolve_model

    args.model = resolve_model(args.model)
    result = measure(args.model, args.sparsity, args.repeat)
    print(f"{result['layers']} sparse layers, {result['threads']} torch threads: from_pretrained "
          f"{result['load_s']:.3f} s (median of {args.repeat}, checks included); tensor checks alone "
          f"{result['checks_s'] * 1000:.1f} ms = {100 * result['checks_s'] / result['load_s']:.1f}% of the load")
    return result


if __name__ == "__main__":
    main()
