"""Load a permllm checkpoint and generate text.

    python examples/inference.py permllm-pruned --prompt "The history of the city"
    python examples/inference.py me/SmolLM2-135M-2of4 --device cuda --dtype float16   # 2:4 kernels on a GPU

`import optimum_permllm` is the one extra line: it registers the checkpoint format with transformers.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import optimum_permllm  # noqa: F401  (registers quant_method="permllm" with transformers)
from optimum_permllm import sparsity_report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="permllm checkpoint folder or Hub id")
    parser.add_argument("--prompt", default="The history of the city")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return parser


def main(argv=None) -> str:
    args = build_parser().parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=getattr(torch, args.dtype))
    model = model.to(args.device).eval()
    print(f"{len(sparsity_report(model))} sparse layers ({model.config.quantization_config.sparsity})")
    inputs = tokenizer(args.prompt, return_tensors="pt").to(args.device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    text = tokenizer.decode(output[0], skip_special_tokens=True)
    print(text)
    return text


if __name__ == "__main__":
    main()
