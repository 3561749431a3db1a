"""The CUDA fast path of a 2:4 layer: PyTorch's semi-structured sparse tensor, built at load time.

`torch.sparse` offers two backends. cuSPARSELt is used whenever PyTorch was built with it (it is the only
one that runs on Hopper); CUTLASS serves compute capability 8.x otherwise. The compressed layout is
opaque and version-specific, so it is never serialised: layers keep the portable packed form and call
`compress_weight` on the GPU. Inputs arrive already in the layer's permuted column order.

The sparse kernel only pays off for many tokens (long prefills), from a count that depends on the weight's
shape and the card (`min_tokens_for`); `sparse_linear` sends smaller calls to a dense matmul with the same
masked weight, so a 2:4 model is never slower than the dense one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.sparse import (
    SparseSemiStructuredTensor,
    SparseSemiStructuredTensorCUSPARSELT,
    SparseSemiStructuredTensorCUTLASS,
)

# When the 2:4 kernel is used, measured by benchmarks/bench_linear.py on an NVIDIA H200 (torch 2.11 + CUDA 13.0,
# cuSPARSELt 0.8, 2026-12-04; BENCHMARKS.md, "GPU check"). Each call through torch.sparse costs about 0.6-1.4 ms
# whatever its size, so the kernel only beat dense for LLaMA-7B MLP shapes from 6144-8192 tokens (1.2-1.4x at
# 8192) and never for 4096x4096 (0.42x at 8192). Weight shape (out_features, in_features) -> the token count
# from which the kernel is used; None: never. bench_linear.py prints this table ("Dispatch table") to paste.
MIN_TOKENS_BY_SHAPE: dict[tuple[int, int], int | None] = {
    (4096, 4096): None,  # LLaMA-7B q/k/v/o: 0.42x at 8192 tokens
    (11008, 4096): 6144,  # gate/up: 1.22x at 6144 tokens
    (4096, 11008): 8192,  # down: 1.37x at 8192 tokens
}

# Unlisted shapes use the kernel from this many multiply-adds per call (tokens x out x in), the size above every
# measured loss (the fixed cost of a call only pays off on large products).
KERNEL_MIN_MACS = 370_000_000_000  # bench_linear: (8192 + 1) x 4096 x 11008, rounded up

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)

Backend = type[SparseSemiStructuredTensor]


def _cusparselt_available() -> bool:
    """True when this PyTorch build ships cuSPARSELt."""
    return bool(torch.backends.cusparselt.is_available())


def _device_capability(device: torch.device) -> tuple[int, int]:
    """Compute capability (major, minor) of a CUDA device."""
    return torch.cuda.get_device_capability(device)


def _cuda_ready(device: torch.device) -> bool:
    """True when CUDA works in this process (split out so tests can stand in for a GPU)."""
    return torch.cuda.is_available()


def min_tokens_for(out_features: int, in_features: int) -> float:
    """Token count from which a layer of this weight shape uses the 2:4 kernel (inf: never)."""
    shape = (out_features, in_features)
    if shape in MIN_TOKENS_BY_SHAPE:
        threshold = MIN_TOKENS_BY_SHAPE[shape]
        return math.inf if threshold is None else threshold
    return max(1, math.ceil(KERNEL_MIN_MACS / max(out_features * in_features, 1)))


def select_backend(device: torch.device | str) -> tuple[Backend | None, str | None]:
    """The semi-structured tensor class for this CUDA device, or (None, reason) when there is none."""
    device = torch.device(device)
    if device.type != "cuda":
        return None, f"device {device} is not CUDA (semi-structured kernels run on NVIDIA GPUs only)"
    if not _cuda_ready(device):
        return None, "CUDA is not available in this process"
    capability = _device_capability(device)
    if capability < (8, 0):
        return None, f"compute capability {capability[0]}.{capability[1]} < 8.0 has no sparse tensor cores"
    if _cusparselt_available() and not SparseSemiStructuredTensor._FORCE_CUTLASS:
        return SparseSemiStructuredTensorCUSPARSELT, None
    if capability[0] == 8:
        return SparseSemiStructuredTensorCUTLASS, None
    return None, (
        f"cuSPARSELt is unavailable in this PyTorch build and the CUTLASS backend only runs on compute "
        f"capability 8.x (this GPU is {capability[0]}.{capability[1]}): install a PyTorch wheel with cuSPARSELt"
    )


def layout_reason(weight_shape, dtype: torch.dtype, backend: Backend) -> str | None:
    """Why `backend` cannot compress a weight of this shape and dtype, or None when it can."""
    if len(weight_shape) != 2:
        return f"weight must be 2-D, got shape {tuple(weight_shape)}"
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} is not float16/bfloat16"
    rows_multiple, cols_multiple = sparse_alignment(backend, dtype)
    rows, cols = weight_shape
    if rows % rows_multiple or cols % cols_multiple or rows == 0 or cols == 0:
        return (f"shape {tuple(weight_shape)} is not a multiple of ({rows_multiple}, {cols_multiple}) "
                f"required by the {backend.BACKEND} backend for {dtype}")
    return None


def sparse_alignment(backend: Backend, dtype: torch.dtype) -> tuple[int, int]:
    """(row, column) multiples a weight must have for `backend` in `dtype`."""
    constraints = backend._DTYPE_SHAPE_CONSTRAINTS[dtype]
    return constraints.sparse_min_rows, constraints.sparse_min_cols


def semi_structured_support(weight_shape, dtype: torch.dtype, device, n: int, m: int) -> str | None:
    """None when torch.sparse.to_sparse_semi_structured can serve this layer, else a short reason."""
    if (n, m) != (2, 4):
        return f"{n}:{m} sparsity has no hardware kernel (only 2:4)"
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} is not float16/bfloat16"
    backend, reason = select_backend(device)
    if backend is None:
        return reason
    return layout_reason(weight_shape, dtype, backend)


def compress_weight(dense_permuted_weight: torch.Tensor) -> SparseSemiStructuredTensor:
    """Compress a dense 2:4 weight [out, in] (permuted column order) for the sparse kernel of its GPU."""
    weight = dense_permuted_weight.detach()
    backend, reason = select_backend(weight.device)
    reason = reason or layout_reason(weight.shape, weight.dtype, backend)
    if reason is not None:
        raise ValueError(f"Cannot build a semi-structured weight: {reason}. Keep this layer on the dense path.")
    return backend.from_dense(weight.contiguous())


def token_multiple(compressed: torch.Tensor) -> int:
    """Row multiple the kernel wants for the dense operand (1 for a plain dense stand-in)."""
    if isinstance(compressed, SparseSemiStructuredTensor):
        return type(compressed)._DTYPE_SHAPE_CONSTRAINTS[compressed.dtype].dense_min_rows
    return 1


def kernel_linear(x2d: torch.Tensor, compressed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x2d @ compressed.T + bias through the semi-structured kernel (torch dispatches on the weight)."""
    return F.linear(x2d, compressed, bias)


class SemiStructuredMatmul(torch.autograd.Function):
    """y = x @ W.T + bias with a compressed 2:4 weight; backward gives grad_x = grad_y @ W (W frozen).

    The compressed tensor has no backward of its own, and W.T of a 2:4 weight is not 2:4 along its rows,
    so grad_x uses the dense permuted weight from `dense_weight_fn`. The bias gradient is returned too.
    `matmul(x2d, compressed, bias)` is the kernel call, replaceable so the padding logic runs on a CPU.
    """

    @staticmethod
    def forward(ctx, x, compressed, dense_weight_fn: Callable[[], torch.Tensor], bias, matmul=kernel_linear):
        ctx.dense_weight_fn = dense_weight_fn
        ctx.has_bias = bias is not None
        x2d = x.reshape(-1, x.shape[-1])
        tokens = x2d.shape[0]
        padded = pad_rows(x2d, token_multiple(compressed))
        y2d = matmul(padded, compressed, bias)[:tokens]
        return y2d.reshape(*x.shape[:-1], y2d.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        weight = ctx.dense_weight_fn().to(grad_y.dtype)
        grad_x = grad_y @ weight if ctx.needs_input_grad[0] else None
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias, None


def pad_rows(x2d: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the rows of a 2-D tensor up to a multiple (unchanged when already aligned)."""
    missing = -x2d.shape[0] % multiple
    x2d = x2d.contiguous()
    return F.pad(x2d, (0, 0, 0, missing)) if missing else x2d


def sparse_linear(x: torch.Tensor, compressed: torch.Tensor, dense_weight_fn: Callable[[], torch.Tensor],
                  bias: torch.Tensor | None, min_tokens: float) -> torch.Tensor:
    """Linear layer on permuted input: the sparse kernel for >= min_tokens tokens, else a dense matmul.

    `dense_weight_fn()` returns the dense permuted weight [out, in] (zeros where pruned); it serves small
    calls, dtype mismatches (the kernel needs x, weight and bias in one dtype) and the backward pass.
    """
    tokens = x.numel() // max(x.shape[-1], 1)
    same_dtype = x.dtype == compressed.dtype and (bias is None or bias.dtype == x.dtype)
    if tokens < min_tokens or not same_dtype or tokens == 0:
        weight = dense_weight_fn().to(x.dtype)
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
    return SemiStructuredMatmul.apply(x, compressed, dense_weight_fn, bias)
