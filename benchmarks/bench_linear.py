"""Per-linear timing of the 2:4 fast path at LLaMA-2-7B shapes, and per shape the token count where it wins.

Compares, for each shape, token count and dtype: a dense nn.Linear; the 2:4 semi-structured kernel with
the input already permuted (permutation folded away); with the permutation applied by index_select; the
PermutedSparseLinear module itself (index_select, then its 2:4 or dense path by token count); and an
RMSNorm followed by the layer, unfused (Hugging Face eager norm, dense layer) versus the fused permuted
norm feeding the 2:4 layer. Then sweeps 1..8192 tokens per shape and prints the dispatch table: for each
weight shape, the smallest token count from which the kernel beats dense at that count and every larger
one, as the dict to paste into `optimum_permllm.nn.cuda_sparse.MIN_TOKENS_BY_SHAPE` (None: the kernel never
won, the shape stays dense) and `KERNEL_MIN_MACS`, the call size from which unlisted shapes use it. Also reports
weight memory, and where the 2:4 module is slower than the dense layer.

    python benchmarks/bench_linear.py                      # on a CUDA GPU (benchmarks/gpu_check.sh runs it)
    python benchmarks/bench_linear.py --device cpu --quick # seconds-long smoke run (no sparse kernel)

Run from the repository root with the package installed (or PYTHONPATH=.).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

from optimum_permllm.kernels import permuted_norm
from optimum_permllm.kernels.permuted_norm import norm_reference
from optimum_permllm.nn import PermutedSparseLinear
from optimum_permllm.nn.cuda_sparse import (
    KERNEL_MIN_MACS,
    MIN_TOKENS_BY_SHAPE,
    compress_weight,
    semi_structured_support,
)
from optimum_permllm.sparse.nm import nm_mask, pack_nm, packed_nbytes

# (in_features, out_features, layers): LLaMA-2-7B.
LLAMA2_7B_SHAPES = [(4096, 4096, "q/k/v/o"), (4096, 11008, "gate/up"), (11008, 4096, "down")]
QUICK_SHAPES = [(256, 256, "q/k/v/o"), (256, 688, "gate/up"), (688, 256, "down")]
SWEEP_TOKENS = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096,
                6144, 8192]
TOKENS = [1, 16, 128, 512, 2048, 8192]  # issue 28: decode, small batches, prefill chunks
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
EPS = 1e-5


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (CPU smoke test)")
    parser.add_argument("--tokens", type=int, nargs="+", help=f"token counts (default {' '.join(map(str, TOKENS))})")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="default fp16 bf16 (fp32 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls before timing")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (the median is reported)")
    parser.add_argument("--inner", type=int, default=None, help="calls per timed repeat")
    parser.add_argument("--sweep-tokens", type=int, nargs="+", default=SWEEP_TOKENS,
                        help="token counts of the per-shape threshold sweep")
    parser.add_argument("--no-sweep", action="store_true", help="skip the per-shape threshold sweep")
    args = parser.parse_args(argv)
    quick = args.quick
    args.shapes = QUICK_SHAPES if quick else LLAMA2_7B_SHAPES
    args.tokens = args.tokens or ([1, 16, 64] if quick else TOKENS)
    args.dtypes = [DTYPES[d] for d in (args.dtypes or (["fp32"] if quick else ["fp16", "bf16"]))]
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 10)
    args.repeats = args.repeats if args.repeats is not None else (3 if quick else 30)
    args.inner = args.inner if args.inner is not None else (1 if quick else 10)
    args.sweep_tokens = sorted(set(args.sweep_tokens))
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; use --device cpu --quick for a smoke run")
    return args


def time_ms(fn, device: torch.device, warmup: int, repeats: int, inner: int) -> float:
    """Median milliseconds of one call of `fn` (CUDA events on a GPU, perf_counter on a CPU)."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / inner)
            else:
                began = time.perf_counter()
                for _ in range(inner):
                    fn()
                samples.append((time.perf_counter() - began) * 1e3 / inner)
    return statistics.median(samples)


def build_layer(in_features: int, out_features: int, dtype, device, seed: int = 0) -> dict:
    """A random 2:4 layer: dense and masked-permuted weights, its permutation, norm weight, compressed form,
    and the same layer as a PermutedSparseLinear."""
    g = torch.Generator(device=device).manual_seed(seed)
    dense = torch.randn(out_features, in_features, generator=g, device=device, dtype=dtype) / in_features ** 0.5
    perm = torch.randperm(in_features, generator=g, device=device)
    permuted = dense[:, perm]
    masked = permuted.masked_fill(~nm_mask(permuted.abs(), 2, 4), 0).contiguous()
    reason = semi_structured_support(masked.shape, dtype, device, 2, 4)
    module = PermutedSparseLinear(in_features, out_features, 2, 4, bias=False, device=device, dtype=dtype)
    module.load_packed(masked, perm)
    return {
        "module": module,
        "dense": dense, "masked": masked, "perm": perm, "reason": reason,
        "compressed": compress_weight(masked) if reason is None else None,
        "norm_weight": torch.rand(in_features, generator=g, device=device, dtype=dtype) + 0.5,
    }


def variants(layer: dict, x: torch.Tensor) -> dict:
    """Name -> zero-argument call. '2:4' uses the compressed weight, or the dense masked one without it."""
    dense, perm, g = layer["dense"], layer["perm"], layer["norm_weight"]
    sparse = layer["compressed"] if layer["compressed"] is not None else layer["masked"]
    folded = x.index_select(-1, perm)
    return {
        "dense": lambda: F.linear(x, dense),
        "2:4": lambda: F.linear(folded, sparse),
        "2:4+index_select": lambda: F.linear(x.index_select(-1, perm), sparse),
        "PermutedSparseLinear": lambda: layer["module"](x),
        "norm+dense": lambda: F.linear(norm_reference(x, g, None, EPS, "rms"), dense),
        "fused_norm+2:4": lambda: F.linear(permuted_norm(x, g, None, perm, EPS, "rms"), sparse),
    }


def timing_rows(args) -> tuple[list[str], list[list[str]], list[str]]:
    """One Markdown row per (shape, tokens, dtype) with the time of every variant in ms, and the rows where
    the PermutedSparseLinear module (what a 2:4 model runs) is slower than the dense layer."""
    names = list(variants(build_layer(16, 16, torch.float32, torch.device("cpu")), torch.zeros(1, 16)))
    headers = ["layer", "in->out", "tokens", "dtype", *[f"{n} (ms)" for n in names], "2:4+index_select speedup",
               "module speedup", "gather share"]
    rows, slower = [], []
    for in_f, out_f, label in args.shapes:
        for dtype in args.dtypes:
            layer = build_layer(in_f, out_f, dtype, args.device)
            for tokens in args.tokens:
                x = torch.randn(tokens, in_f, device=args.device, dtype=dtype)
                times = {n: time_ms(fn, args.device, args.warmup, args.repeats, args.inner)
                         for n, fn in variants(layer, x).items()}
                cells = [f"{times[n]:.4f}" if label != "down" or "norm" not in n else "-" for n in names]
                module_speedup = times["dense"] / times["PermutedSparseLinear"]
                gather_share = 1 - times["2:4"] / times["2:4+index_select"]
                rows.append([label, f"{in_f}->{out_f}", str(tokens), _dtype_name(dtype), *cells,
                             f"{times['dense'] / times['2:4+index_select']:.2f}x", f"{module_speedup:.2f}x",
                             f"{gather_share:.0%}"])
                if module_speedup < 1:
                    slower.append(f"{label} {in_f}->{out_f} {_dtype_name(dtype)} at {tokens} tokens "
                                  f"({module_speedup:.2f}x)")
    return headers, rows, slower


def sweep_thresholds(args) -> tuple[list[str], list[list[str]], dict]:
    """Dense time / 2:4 time per swept token count for every (shape, dtype), and per weight shape
    (out_features, in_features) the smallest swept count from which the kernel wins at it and every larger
    swept count, for all dtypes (None when it never does)."""
    headers = ["tokens"] + [f"{label} {_dtype_name(d)}" for _, _, label in args.shapes for d in args.dtypes]
    columns, by_shape = [], {}
    for in_f, out_f, _ in args.shapes:
        wins = []
        for dtype in args.dtypes:
            layer = build_layer(in_f, out_f, dtype, args.device)
            ratios = []
            for tokens in args.sweep_tokens:
                x = torch.randn(tokens, in_f, device=args.device, dtype=dtype)
                calls = variants(layer, x)
                dense = time_ms(calls["dense"], args.device, args.warmup, args.repeats, args.inner)
                sparse = time_ms(calls["2:4"], args.device, args.warmup, args.repeats, args.inner)
                ratios.append(dense / sparse)
            columns.append(ratios)
            wins.append(first_lasting_win(args.sweep_tokens, ratios))
        by_shape[(out_f, in_f)] = None if None in wins else max(wins)
    rows = [[str(t)] + [f"{col[i]:.2f}x" for col in columns] for i, t in enumerate(args.sweep_tokens)]
    return headers, rows, by_shape


def first_lasting_win(tokens: list[int], ratios: list[float]) -> int | None:
    """The first token count from which dense/sparse stays above 1 up to the largest count, or None."""
    for i, count in enumerate(tokens):
        if all(r > 1.0 for r in ratios[i:]):
            return count
    return None


def dispatch_lines(by_shape: dict, shapes, largest_tokens: int) -> list[str]:
    """The dispatch table as Python to paste into optimum_permllm/nn/cuda_sparse.py, with what it means."""
    labels = {(out_f, in_f): label for in_f, out_f, label in shapes}
    entries = [f"    ({out_f}, {in_f}): {threshold},  # {labels[(out_f, in_f)]}"
               for (out_f, in_f), threshold in by_shape.items()]
    return [
        "Paste into optimum_permllm/nn/cuda_sparse.py (keys: weight shape (out_features, in_features); value:",
        "the token count from which the 2:4 kernel is used; None: that shape always stays on the dense path;",
        "KERNEL_MIN_MACS: the multiply-adds per call above every measured loss and at every measured win):\n",
        "```python", "MIN_TOKENS_BY_SHAPE = {", *entries, "}",
        f"KERNEL_MIN_MACS = {kernel_min_macs(by_shape, largest_tokens):.2g}",
        "```",
        f"\n(in use now: KERNEL_MIN_MACS = {KERNEL_MIN_MACS:.2g}, MIN_TOKENS_BY_SHAPE = {MIN_TOKENS_BY_SHAPE})",
    ]


def kernel_min_macs(by_shape: dict, largest_tokens: int) -> float:
    """The smallest tokens x out x in, rounded up to two digits, at or above every shape's winning threshold and
    above every shape that never won at the largest count swept (unlisted shapes use the kernel from there)."""
    bounds = [(largest_tokens + 1 if t is None else t) * out_f * in_f for (out_f, in_f), t in by_shape.items()]
    bound = max(bounds)
    scale = 10 ** (len(str(int(bound))) - 2)
    return float(-(-bound // scale) * scale)


def memory_rows(args) -> tuple[list[str], list[list[str]]]:
    """Weight bytes per layer: dense, portable packed (values + bitmask + perm), compressed on the GPU, and
    what the PermutedSparseLinear module holds on its device after a forward (packed + derived weights)."""
    headers = ["layer", "in->out", "dtype", "dense (MiB)", "packed+perm (MiB)", "compressed (MiB)",
               "module after a call (MiB)"]
    rows = []
    for in_f, out_f, label in args.shapes:
        for dtype in args.dtypes:
            layer = build_layer(in_f, out_f, dtype, args.device)
            values, bitmask = pack_nm(layer["masked"], 2, 4)
            dense = layer["dense"].numel() * layer["dense"].element_size()
            packed = packed_nbytes(values, bitmask, layer["perm"])
            compressed = _compressed_nbytes(layer["compressed"])
            module = layer["module"]
            with torch.inference_mode():
                module(torch.randn(max(args.tokens), in_f, device=args.device, dtype=dtype))
            rows.append([label, f"{in_f}->{out_f}", _dtype_name(dtype), _mib(dense), _mib(packed),
                         _mib(compressed) if compressed else f"n/a ({layer['reason']})", _mib(module_nbytes(module))])
    return headers, rows


def module_nbytes(module: PermutedSparseLinear) -> int:
    """Bytes a PermutedSparseLinear holds: its state plus the weights it derived (compressed, unpacked)."""
    state = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    compressed = _compressed_nbytes(module._compressed[1]) if module._compressed else 0
    unpacked = module._dense[1].numel() * module._dense[1].element_size() if module._dense else 0
    return state + compressed + unpacked


def _compressed_nbytes(compressed) -> int:
    """Bytes held by the inner tensors of a semi-structured tensor (0 for None)."""
    if compressed is None:
        return 0
    inner = [getattr(compressed, name) for name in ("packed", "meta", "packed_t", "meta_t",
                                                    "compressed_swizzled_bitmask")]
    return sum(t.numel() * t.element_size() for t in inner if t is not None)


def environment_lines(device: torch.device) -> list[str]:
    """Card, driver, torch, CUDA and cuSPARSELt versions (or the CPU) the numbers were taken on."""
    lines = [f"- torch {torch.__version__}, CUDA {torch.version.cuda}, python {platform.python_version()}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"- device: {props.name} (compute capability {props.major}.{props.minor}, "
                     f"{props.total_memory / 2**30:.0f} GiB), driver {_driver_version()}")
        cusparselt = torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None
        lines.append(f"- cuSPARSELt: {cusparselt or 'unavailable'}")
    else:
        lines.append(f"- device: CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    return lines


def _driver_version() -> str:
    """The NVIDIA driver version from nvidia-smi, or 'unknown'."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _dtype_name(dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f}"


def main(argv=None) -> None:
    args = parse_args(argv)
    on_gpu = args.device.type == "cuda"
    if not on_gpu and args.quick:
        torch.set_num_threads(1)  # smoke runs share small CI machines: avoid oversubscribed thread pools
    print("## Per-linear timing (median ms per call)\n")
    print("\n".join(environment_lines(args.device)))
    if not on_gpu:
        print("- no sparse kernel on this device: the '2:4' columns use the dense masked weight")
    print(f"- warm-up {args.warmup}, repeats {args.repeats} x {args.inner} calls; "
          "norm columns apply to layers fed by a norm (not down); module speedup = dense / "
          "PermutedSparseLinear (what a 2:4 model runs); gather share = the index_select's part of 2:4+index_select\n")
    headers, rows, slower = timing_rows(args)
    print(markdown_table(headers, rows))
    print("\n2:4 module slower than the dense layer: " + ("; ".join(slower) if slower else "nowhere in this table"))
    print("\n## Weight memory per layer\n")
    print(markdown_table(*memory_rows(args)))
    if args.no_sweep:
        print(f"\nThreshold sweep skipped (--no-sweep); KERNEL_MIN_MACS = {KERNEL_MIN_MACS:.2g}")
        return
    headers, rows, by_shape = sweep_thresholds(args)
    print("\n## Threshold sweep: dense time / 2:4 time (input already permuted)\n")
    if not on_gpu:
        print("CPU stand-in: '2:4' is the dense masked weight, so these ratios and the table below say nothing "
              "about a GPU; they only exercise the sweep.\n")
    print(markdown_table(headers, rows))
    print("\n## Dispatch table\n")
    print("\n".join(dispatch_lines(by_shape, args.shapes, args.sweep_tokens[-1])))


if __name__ == "__main__":
    main()
