"""End-to-end timing of a LLaMA-7B-shaped model with random weights: dense vs every decoder linear at 2:4.

Measures the prefill time of one sequence, decode throughput (one token per sequence per step with the
KV cache) at each batch size, and the GPU memory of the weights. The sparse model is built with
`PermutedSparseLinear.from_linear(linear, n=2, m=4, mask=None, perm=...)` (magnitude masks; random input
permutations by default, so every layer pays its gather: the worst case, with nothing folded).

    python benchmarks/bench_e2e.py                                   # LLaMA-7B shapes on a CUDA GPU
    python benchmarks/bench_e2e.py --device cpu --layers 2 --hidden 256 --prefill 64 --decode 4 --vocab 1024

Run from the repository root with the package installed (or PYTHONPATH=.).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from optimum_permllm.nn import PermutedSparseLinear

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size (intermediate = 11008/4096 of it)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prefill", type=int, default=2048, help="prompt tokens for the prefill timing")
    parser.add_argument("--decode", type=int, default=64, help="decode steps for tokens/s")
    parser.add_argument("--decode-batch", type=int, nargs="+", default=[1, 32],
                        help="batch sizes of the decode timing (sequences decoded together)")
    parser.add_argument("--repeats", type=int, default=3, help="prefill repeats (the median is reported)")
    parser.add_argument("--perm", choices=["random", "none"], default="random",
                        help="input permutation of every sparse linear (none = identity, no gather)")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; use --device cpu --layers 2 --hidden 256 for a smoke run")
    args.dtype = DTYPES[args.dtype or ("fp16" if args.device.type == "cuda" else "fp32")]
    return args


def llama_config(args):
    """A LLaMA config of the requested size (head dim 128 at 7B; at least 1 head; widths multiples of 64)."""
    from transformers import LlamaConfig

    heads = max(1, args.hidden // 128)
    intermediate = max(64, round(args.hidden * 11008 / 4096 / 64) * 64)
    return LlamaConfig(hidden_size=args.hidden, intermediate_size=intermediate, num_hidden_layers=args.layers,
                       num_attention_heads=heads, num_key_value_heads=heads, vocab_size=args.vocab,
                       max_position_embeddings=max(4096, args.prefill + args.decode))


def build_model(args) -> nn.Module:
    """The randomly initialised model, built directly on the device in the benchmark dtype."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(llama_config(args), dtype=args.dtype)
    return model.eval()


def sparsify_(model: nn.Module, perm: str) -> int:
    """Replace every nn.Linear of the decoder layers by a 2:4 PermutedSparseLinear; returns how many."""
    replaced = 0
    for layer in model.model.layers:
        for name, linear in list(layer.named_modules()):
            if not isinstance(linear, nn.Linear):
                continue
            order = torch.randperm(linear.in_features, device=linear.weight.device) if perm == "random" else None
            sparse = PermutedSparseLinear.from_linear(linear, n=2, m=4, mask=None, perm=order)
            parent_name, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent_name) if parent_name else layer, child, sparse)
            replaced += 1
    return replaced


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (the portable state, not the derived CUDA form)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_prefill(model, input_ids, repeats: int) -> float:
    """Median seconds of a forward pass over the whole prompt (after one warm-up pass)."""
    samples = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            synchronize(input_ids.device)
            began = time.perf_counter()
            model(input_ids, use_cache=False)
            synchronize(input_ids.device)
            if i:
                samples.append(time.perf_counter() - began)
    return statistics.median(samples)


def decode_tokens_per_second(model, input_ids, steps: int) -> float:
    """Tokens/s (all sequences of the batch) of one-token forward steps that extend a KV cache filled by the
    prompt."""
    with torch.inference_mode():
        out = model(input_ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        out = model(token, past_key_values=cache, use_cache=True)  # warm-up step
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        synchronize(input_ids.device)
        began = time.perf_counter()
        for _ in range(steps):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        synchronize(input_ids.device)
    return steps * input_ids.shape[0] / (time.perf_counter() - began)


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the decoder linears' weights as they sit on the device: a dense weight (and bias), or a
    PermutedSparseLinear's packed state plus the weights it derived for the forward (compressed, unpacked)."""
    total = 0
    for module in model.model.layers.modules():
        if isinstance(module, PermutedSparseLinear):
            tensors = [*module.parameters(), *module.buffers()]
            tensors += [derived[1] for derived in (module._compressed, module._dense) if derived and derived[1] is not None]
            total += sum(_nbytes(t) for t in tensors)
        elif isinstance(module, nn.Linear):
            total += sum(_nbytes(t) for t in module.parameters())
    return total


def _nbytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor, or of the inner tensors of a semi-structured one."""
    from torch.sparse import SparseSemiStructuredTensor

    if isinstance(tensor, SparseSemiStructuredTensor):
        inner = [getattr(tensor, name) for name in ("packed", "meta", "packed_t", "meta_t", "compressed_swizzled_bitmask")]
        return sum(t.numel() * t.element_size() for t in inner if t is not None)
    return tensor.numel() * tensor.element_size()


def measure(model, args) -> dict:
    """Prefill seconds, decode tokens/s per batch size, weight bytes and (CUDA) allocated bytes after the runs."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, args.vocab, (1, args.prefill), generator=generator).to(args.device)
    prompt = min(args.prefill, 128)
    result = {"prefill_s": time_prefill(model, input_ids, args.repeats), "decode_tok_s": {}}
    for batch in args.decode_batch:
        prompts = torch.randint(0, args.vocab, (batch, prompt), generator=generator).to(args.device)
        result["decode_tok_s"][batch] = decode_tokens_per_second(model, prompts, args.decode)
    result["weights"] = weight_bytes(model)
    result["linear_weights"] = linear_weight_bytes(model)
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
        result["allocated"] = torch.cuda.memory_allocated(args.device)
    return result


def report(config, args, dense: dict, sparse: dict, replaced: int, dense_again: dict) -> str:
    """The Markdown summary of the runs: dense, 2:4, and the dense model measured again last (the spread
    between the two dense rows bounds what order and warm-up do to the comparison)."""
    def gib(n):
        return f"{n / 2**30:.3f}" if n is not None else "n/a"

    batches = args.decode_batch
    lines = [
        "## End-to-end: dense vs 2:4 (random weights)\n",
        f"- model: LLaMA shape, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"intermediate {config.intermediate_size}, vocab {config.vocab_size}, {args.dtype}, {args.device}",
        f"- {replaced} linears at 2:4, input permutation: {args.perm}; lm_head and embeddings dense",
        f"- torch {torch.__version__}, CUDA {torch.version.cuda}"
        + (f", {torch.cuda.get_device_name(args.device)}" if args.device.type == "cuda" else ""),
        f"- decode: {args.decode} steps after a {min(args.prefill, 128)}-token prompt per sequence, tokens/s summed "
        "over the batch",
        "- decoder linear weights: as held on the device after the runs (2:4: packed values + bitmask + "
        "permutation, plus the compressed 2:4 weight and any unpacked copy built at first use); "
        "GPU allocated: everything left after the runs\n",
        f"| model | prefill {args.prefill} tok (ms) | "
        + " | ".join(f"decode batch {b} (tok/s)" for b in batches)
        + " | decoder linear weights (GiB) | all weights (GiB) | GPU allocated (GiB) |",
        "|---|---|" + "---|" * len(batches) + "---|---|---|",
    ]
    for name, r in (("dense", dense), ("2:4", sparse), ("dense, measured again last", dense_again)):
        decode = " | ".join(f"{r['decode_tok_s'][b]:.1f}" for b in batches)
        lines.append(f"| {name} | {r['prefill_s'] * 1e3:.1f} | {decode} | {gib(r['linear_weights'])} | "
                     f"{gib(r['weights'])} | {gib(r.get('allocated'))} |")
    # Speed-ups against the dense model measured last: the first model measured pays the process's warm-up
    # (on a CPU smoke run the first dense decode was several times slower than the same model measured again).
    decode_speedups = ", ".join(f"batch {b} {sparse['decode_tok_s'][b] / dense_again['decode_tok_s'][b]:.2f}x"
                                for b in batches)
    lines.append(f"\nagainst the dense model measured last: prefill speedup "
                 f"{dense_again['prefill_s'] / sparse['prefill_s']:.2f}x, decode speedup {decode_speedups}, "
                 f"decoder linear weights {sparse['linear_weights'] / dense['linear_weights']:.3f}x of dense")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device.type == "cpu":
        torch.set_num_threads(1)  # smoke runs share small CI machines: avoid oversubscribed thread pools
    model = build_model(args)
    dense = measure(model, args)
    replaced = sparsify_(model, args.perm)
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
    sparse = measure(model, args)
    del model
    dense_again = measure(build_model(args), args)  # the same dense model once more: shows drift and warm-up bias
    print(report(llama_config(args), args, dense, sparse, replaced, dense_again))


if __name__ == "__main__":
    main()
