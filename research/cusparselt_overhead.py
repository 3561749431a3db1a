"""Where the time of a torch.sparse 2:4 matmul goes on a GPU: host overhead or the cuSPARSELt kernel.

The GPU check of 2026-12-04 (H200, torch 2.11) saw each 2:4 call take 0.6-1.4 ms whatever its size. This
times, per LLaMA-7B shape at a few token counts: dense F.linear; F.linear on the semi-structured tensor;
torch._cslt_sparse_mm called directly; the same call replayed from a CUDA graph (no host work); and the
CUDA kernel time the profiler sees for one call. A graph replay near the kernel time means the cost is on
the host (plan set-up per call), which a cached plan or graph capture would remove.

    python research/cusparselt_overhead.py            # on a CUDA GPU
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.sparse import to_sparse_semi_structured

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_linear  # noqa: E402  (the benchmarks' timer, so both measure alike)

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
TOKENS = [16, 2048, 8192]


def time_ms(fn, repeats: int = 20, inner: int = 5) -> float:
    """Median ms per call, CUDA events around `inner` calls (bench_linear's timer)."""
    return bench_linear.time_ms(fn, torch.device("cuda"), warmup=3, repeats=repeats, inner=inner)


def graph_ms(fn) -> float:
    """Median ms per call of `fn` replayed from a CUDA graph (host work removed), or nan if capture fails."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return time_ms(graph.replay)
    except Exception as error:  # noqa: BLE001 - a diagnostic: report and go on
        print(f"  graph capture failed: {type(error).__name__}: {str(error)[:200]}")
        return float("nan")


def kernel_ms(fn) -> float:
    """CUDA time the profiler attributes to one call's kernels."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        fn()
        torch.cuda.synchronize()
    return sum(e.device_time_total for e in profile.key_averages()) / 1e3


def safe(measure, fn) -> float:
    """measure(fn), or nan with the error printed (one failing variant must not end the diagnostic)."""
    try:
        return measure(fn)
    except Exception as error:  # noqa: BLE001
        print(f"  {measure.__name__} failed: {type(error).__name__}: {str(error)[:200]}")
        return float("nan")


def main() -> None:
    torch.manual_seed(0)
    print(f"- {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"cuSPARSELt {torch.backends.cusparselt.version()}\n")
    print("| out x in | tokens | dense (ms) | F.linear 2:4 (ms) | _cslt_sparse_mm (ms) | 2:4 graph replay (ms) "
          "| 2:4 kernel time, profiler (ms) | dense graph replay (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for out_f, in_f in SHAPES:
            weight = torch.randn(out_f, in_f, device="cuda", dtype=torch.float16)
            weight = weight * torch.tensor([1, 1, 0, 0], device="cuda", dtype=torch.float16).repeat(in_f // 4)
            compressed = to_sparse_semi_structured(weight)
            for tokens in TOKENS:
                x = torch.randn(tokens, in_f, device="cuda", dtype=torch.float16)
                dense = lambda: F.linear(x, weight)  # noqa: E731
                sparse = lambda: F.linear(x, compressed)  # noqa: E731
                direct = lambda: torch._cslt_sparse_mm(compressed.packed, x.t())  # noqa: E731
                cells = [safe(time_ms, dense), safe(time_ms, sparse), safe(time_ms, direct), graph_ms(sparse),
                         safe(kernel_ms, sparse), graph_ms(dense)]
                print(f"| {out_f} x {in_f} | {tokens} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
