"""Modules that replace dense layers in a sparse model."""

from .permuted_sparse_linear import PermutedSparseLinear

__all__ = ["PermutedSparseLinear"]
