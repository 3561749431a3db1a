"""Triton kernels with PyTorch fallbacks (installed as `optimum_permllm.kernels`).

Each public function dispatches to Triton for CUDA tensors when triton is importable and no autograd
graph is being recorded, and to a PyTorch reference with the same semantics otherwise.
"""

from .gather import gather_columns
from .permuted_norm import NORM_KINDS, permuted_norm

__all__ = ["NORM_KINDS", "gather_columns", "permuted_norm"]
