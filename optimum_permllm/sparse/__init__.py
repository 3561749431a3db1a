"""Pure tensor functions for N:M patterns, packing and channel permutations."""

from .nm import NMPattern, check_nm, nm_mask, nm_violations, pack_bits, pack_nm, packed_nbytes, unpack_bits, unpack_nm
from .permutation import check_permutation, compose, identity_permutation, invert_permutation, is_identity

__all__ = [
    "NMPattern",
    "check_nm",
    "nm_mask",
    "nm_violations",
    "pack_bits",
    "pack_nm",
    "packed_nbytes",
    "unpack_bits",
    "unpack_nm",
    "check_permutation",
    "compose",
    "identity_permutation",
    "invert_permutation",
    "is_identity",
]
