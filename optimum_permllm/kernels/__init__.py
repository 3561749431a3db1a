"""Triton kernels with PyTorch fallbacks (installed as `optimum_permllm.kernels`).

Each public function dispatches to Triton for CUDA tensors when triton is importable and no autograd
graph is being recorded, and to a PyTorch reference with the same semantics otherwise.
"""

from .permuted_norm import NORM_KINDS, permuted_norm

__all__ = ["NORM_KINDS", "permuted_norm"]
