"""N:M sparsity as pure tensor functions: masks, pattern checks, and the portable packed format.

Groups are M consecutive entries along the last dimension (the input features of a linear weight).
The packed format stores the N kept values of every group plus a bitmask of where they were, so a
2:4 layer in fp16/bf16 takes 0.5 + 0.0625 of its dense bytes, and the round trip is bit-exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NMPattern:
    """An N:M pattern: at most `n` non-zeros in every group of `m` consecutive input features."""

    n: int
    m: int

    def __post_init__(self):
        if not (isinstance(self.n, int) and isinstance(self.m, int)):
            raise TypeError(f"N:M must be integers, got n={self.n!r}, m={self.m!r}")
        if not 0 < self.n < self.m:
            raise ValueError(
                f"Invalid sparsity {self.n}:{self.m}: N must satisfy 0 < N < M "
                "(for example '2:4' keeps 2 of every 4 weights)."
            )

    @classmethod
    def parse(cls, spec: str | tuple[int, int] | NMPattern) -> NMPattern:
        """Accept '2:4', (2, 4) or an NMPattern."""
        if isinstance(spec, NMPattern):
            return spec
        if isinstance(spec, (tuple, list)) and len(spec) == 2:
            return cls(int(spec[0]), int(spec[1]))
        if isinstance(spec, str):
            match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", spec)
            if match:
                return cls(int(match.group(1)), int(match.group(2)))
        raise ValueError(f"Cannot read sparsity {spec!r}: write it as 'N:M', for example '2:4' or '4:8'.")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    def check_width(self, width: int, what: str = "in_features") -> None:
        """Raise a clear error when `width` cannot be split into groups of M."""
        if width % self.m != 0:
            raise ValueError(
                f"{what}={width} is not divisible by M={self.m}, so it cannot hold a {self} pattern. "
                "Leave this layer dense (add it to `modules_to_not_convert`) or choose a smaller M."
            )


def _groups(tensor: torch.Tensor, m: int) -> torch.Tensor:
    """View the last dimension as (groups, m)."""
    if tensor.shape[-1] % m != 0:
        raise ValueError(f"Last dimension {tensor.shape[-1]} is not divisible by M={m}.")
    return tensor.reshape(*tensor.shape[:-1], tensor.shape[-1] // m, m)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask keeping the `n` highest scores of every `m` consecutive entries of the last dim.

    Ties are broken towards the lower position so the result is deterministic.
    """
    NMPattern(n, m)
    grouped = _groups(scores, m)
    # A stable descending sort keeps the earliest of equal scores first.
    order = torch.sort(grouped.float(), dim=-1, descending=True, stable=True).indices
    mask = torch.zeros_like(grouped, dtype=torch.bool)
    mask.scatter_(-1, order[..., :n], True)
    return mask.reshape(scores.shape)


def check_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of `m` consecutive entries of the last dim has at most `n` non-zeros."""
    NMPattern(n, m)
    return bool(((_groups(weight, m) != 0).sum(-1) <= n).all())


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Number of groups with more than `n` non-zeros (0 means the pattern holds)."""
    return int(((_groups(weight, m) != 0).sum(-1) > n).sum())


def pack_nm(weight: torch.Tensor, n: int, m: int, mask: torch.Tensor | None = None):
    """Pack a 2-D N:M-sparse weight into (values, bitmask).

    values: [rows, cols * n / m] in the weight's dtype, the kept entries of each group in order.
    bitmask: [rows, ceil(cols / 8)] uint8, bit j of the row set where entry j is kept (little endian).
    Without `mask`, the kept set is the non-zeros, topped up with zeros to exactly n per group.
    """
    if weight.dim() != 2:
        raise ValueError(f"pack_nm expects a 2-D weight, got shape {tuple(weight.shape)}.")
    NMPattern(n, m).check_width(weight.shape[1], "columns")
    if mask is None:
        if not check_nm(weight, n, m):
            raise ValueError(
                f"Weight has {nm_violations(weight, n, m)} groups with more than {n} non-zeros out of {m}: "
                f"apply an {n}:{m} mask (nm_mask) before packing."
            )
        mask = nm_mask((weight != 0).to(torch.int8), n, m)
    else:
        mask = mask.to(torch.bool)
        counts = _groups(mask, m).sum(-1)
        if not bool((counts == n).all()):
            raise ValueError(f"mask must keep exactly {n} of every {m} entries.")
    rows = weight.shape[0]
    values = weight[mask].reshape(rows, -1)
    return values.contiguous(), pack_bits(mask)


def unpack_nm(values: torch.Tensor, bitmask: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of pack_nm: the dense [rows, cols] weight with zeros where nothing was kept."""
    mask = unpack_bits(bitmask, cols)
    dense = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    dense[mask] = values.reshape(-1)
    return dense


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean [rows, cols] tensor into [rows, ceil(cols/8)] uint8, little-endian bits."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, -(-cols // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :cols] = mask.to(torch.uint8)
    weights = (2 ** torch.arange(8, device=mask.device, dtype=torch.int32)).to(torch.uint8)
    return (padded.reshape(rows, -1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of pack_bits: a boolean [rows, cols] tensor."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :cols].to(torch.bool)


def packed_nbytes(values: torch.Tensor, bitmask: torch.Tensor, perm: torch.Tensor | None = None) -> int:
    """Bytes a packed layer takes: values, bitmask and (optionally) its permutation indices."""
    total = values.numel() * values.element_size() + bitmask.numel() * bitmask.element_size()
    if perm is not None:
        total += perm.numel() * perm.element_size()
    return total
