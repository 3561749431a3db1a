"""When a kernel call may leave PyTorch for Triton."""

from __future__ import annotations

import importlib.util
from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def has_triton() -> bool:
    """True when the triton package can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Triton serves CUDA tensors outside autograd (the kernels have no backward)."""
    present = [t for t in tensors if t is not None]
    on_cuda = all(t.is_cuda for t in present)
    recording = torch.is_grad_enabled() and any(t.requires_grad for t in present)
    return on_cuda and not recording and has_triton()
