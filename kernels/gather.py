"""Column gather `x[..., perm]`: how a permuted layer reads its input when the permutation is not folded."""

from __future__ import annotations

import torch

from ._dispatch import use_triton

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def gather_columns(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """x.index_select(-1, perm), through a Triton kernel on CUDA (perm must hold valid indices)."""
    if use_triton(x) and x.dtype in TRITON_DTYPES:
        from .triton_gather import gather_columns_triton

        return gather_columns_triton(x, perm)
    return gather_columns_reference(x, perm)


def gather_columns_reference(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """The PyTorch definition (differentiable, any device)."""
    return x.index_select(-1, perm.to(x.device))
