"""A linear layer computed straight from the packed N:M form (values, bitmask), with no dense weight kept.

On CUDA, 2:4 calls of few tokens (decode) run a Triton kernel that reads only the packed weight, about
0.56x of the dense bytes; everything else unpacks the weight for the call and runs a dense matmul, so the
GPU never holds an unpacked copy between calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels._dispatch import use_triton
from ..sparse.nm import unpack_nm

# Largest token count served by the Triton kernel (one program per token and row block re-reads the weight
# per token, from L2): benchmarks/bench_linear.py times it against dense and the 2:4 kernel per count.
MAX_PACKED_TOKENS = 16
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def packed_linear(x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor, bias: torch.Tensor | None,
                  in_features: int, n: int, m: int) -> torch.Tensor:
    """x @ W.T + bias for the N:M weight W packed as (values, bitmask); x is in the weight's column order."""
    if _triton_serves(x, values, bitmask, bias, n, m):
        from ..kernels.triton_packed import packed_24_linear_triton

        return packed_24_linear_triton(x, values, bitmask, bias)
    weight = unpack_nm(values, bitmask, in_features).to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def _triton_serves(x, values, bitmask, bias, n: int, m: int) -> bool:
    """The kernel covers 2:4, few tokens, one floating dtype for x, values and bias, and no autograd."""
    tokens = x.numel() // max(x.shape[-1], 1)
    same_dtype = x.dtype == values.dtype and (bias is None or bias.dtype == x.dtype)
    return ((n, m) == (2, 4) and 0 < tokens <= MAX_PACKED_TOKENS and same_dtype and x.dtype in TRITON_DTYPES
            and use_triton(x, values, bitmask, bias))
