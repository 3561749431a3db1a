"""Checks of stored sparse tensors, as pure tensor functions: each returns None or what is wrong.

They are vectorised (one pass over each tensor, no Python loop over rows or groups), so that a whole
checkpoint is checked at load time for a small fraction of its load time (BENCHMARKS.md).
"""

from __future__ import annotations

import torch

from .nm import unpack_bits


def permutation_problem(perm: torch.Tensor, size: int) -> str | None:
    """What keeps `perm` from being a bijection of range(size), or None when it is one."""
    if perm.dim() != 1 or perm.dtype.is_floating_point or perm.dtype.is_complex or perm.dtype == torch.bool:
        return f"is a {perm.dtype} tensor of shape {tuple(perm.shape)}, not a 1-D integer permutation"
    if perm.numel() != size:
        return f"has {perm.numel()} entries, but the layer has {size} channels"
    if size == 0:
        return None
    low, high = (int(v) for v in torch.aminmax(perm))
    if low < 0 or high >= size:
        return f"has entries outside [0, {size}) (min {low}, max {high})"
    counts = torch.bincount(perm.long(), minlength=size)
    if int(counts.max()) == 1:  # size entries in range, none repeated: a bijection
        return None
    channel = int((counts > 1).nonzero()[0])
    return (f"is not a bijection: channel {channel} appears {int(counts[channel])} times and "
            f"{int((counts == 0).sum())} channels never appear")


def nm_mask_problem(bitmask: torch.Tensor, values: torch.Tensor, in_features: int, n: int, m: int) -> str | None:
    """What keeps a packed layer's bitmask from keeping exactly n of every m entries of each row, matching the
    packed values [rows, in_features * n / m], or None. Groups are read in stored (permuted) column order."""
    rows = values.shape[0] if values.dim() == 2 else -1
    expected = (rows, -(-in_features // 8))
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != expected:
        return f"is a {bitmask.dtype} tensor of shape {tuple(bitmask.shape)}, expected torch.uint8 of shape {expected}"
    if tuple(values.shape) != (rows, in_features * n // m):
        return (f"does not match the packed values: they have shape {tuple(values.shape)}, expected "
                f"{(rows, in_features * n // m)} for {in_features} input features at {n}:{m}")
    if _every_group_keeps(bitmask, in_features, n, m):
        return None
    counts = group_counts(bitmask, in_features, m)
    wrong = counts != n
    row, group = (int(i) for i in wrong.nonzero()[0])
    found = _pattern_of(bitmask, in_features, int(counts.sum()), rows)
    hint = f"; the mask is {found}, so the config's sparsity does not match the tensors" if found else ""
    return (f"is not {n}:{m}: {int(wrong.sum())} groups of {m} do not keep exactly {n} entries "
            f"(row {row}, group {group} keeps {int(counts[row, group])}){hint}")


def _every_group_keeps(bitmask: torch.Tensor, in_features: int, n: int, m: int) -> bool:
    """True when every group of m columns keeps exactly n entries. For M a power of two up to 64, the mask is
    read as 64-bit words and the kept entries of every group are counted in place (a SWAR popcount)."""
    if in_features % 8 or m & (m - 1) or m > 64 or bitmask.numel() % 8 or not bitmask.is_contiguous():
        return bool((group_counts(bitmask, in_features, m) == n).all())
    words = bitmask.reshape(-1).view(torch.int64)
    words = words - ((words >> 1) & 0x5555555555555555)
    width = 2
    while width < m:  # fields of `width` bits hold their popcounts; merge pairs of neighbouring fields
        low = _field_mask(width, 2 * width)
        words = (words & low) + ((words >> width) & low)
        width *= 2
    return bool((words == n * _field_mask(1, m)).all())


def _field_mask(bits: int, period: int) -> int:
    """The 64-bit int with the lowest `bits` bits of every `period`-bit field set (below 2**63)."""
    field = (1 << bits) - 1
    return sum(field << shift for shift in range(0, 64, period))


def non_finite_count(values: torch.Tensor) -> int:
    """How many entries are NaN or infinite. A float32 sum is checked first (one cheap pass); only a sum that is
    not finite (a NaN, an infinity, or an overflow of huge finite values) is followed by an exact count."""
    if not values.is_floating_point() or bool(torch.isfinite(values.sum(dtype=torch.float32))):
        return 0
    return int((~torch.isfinite(values)).sum())


def group_counts(bitmask: torch.Tensor, in_features: int, m: int) -> torch.Tensor:
    """Kept entries in every group of m consecutive columns: an int tensor [rows, in_features // m]."""
    rows = bitmask.shape[0]
    if in_features % 8 == 0 and 8 % m == 0:  # whole groups inside each byte
        return _popcount_table(m, bitmask.device)[bitmask.long()].reshape(rows, -1)
    if in_features % 8 == 0 and m % 8 == 0:  # whole bytes inside each group
        return _popcount_table(8, bitmask.device)[bitmask.long()].reshape(rows, -1, m // 8).sum(-1)
    return unpack_bits(bitmask, in_features).reshape(rows, -1, m).sum(-1)


def _popcount_table(width: int, device) -> torch.Tensor:
    """table[byte] = the number of set bits in each `width`-bit field of the byte, lowest bits first:
    a [256, 8 // width] int16 tensor."""
    bits = (torch.arange(256, device=device).unsqueeze(1) >> torch.arange(8, device=device)) & 1
    return bits.reshape(256, 8 // width, width).sum(-1).to(torch.int16)


def _pattern_of(bitmask: torch.Tensor, in_features: int, kept: int, rows: int) -> str | None:
    """The N:M pattern (M up to 32) that the mask does follow, described, or None."""
    for m in (4, 8, 16, 32):
        if in_features % m or (kept * m) % (rows * in_features):
            continue
        n = kept * m // (rows * in_features)
        if 0 < n < m and bool((group_counts(bitmask, in_features, m) == n).all()):
            return f"{n}:{m}"
    return None
