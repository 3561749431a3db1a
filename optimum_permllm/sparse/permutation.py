"""Channel permutations as pure tensor functions.

Convention used everywhere in the package: a permutation `perm` of the C input channels of a linear
layer means the layer reads `x[..., perm]` and stores its weight as `W[:, perm]`, so that
`x @ W.T == x[..., perm] @ W[:, perm].T`. N:M groups are taken in this permuted order.
"""

from __future__ import annotations

import torch


def identity_permutation(size: int, device=None) -> torch.Tensor:
    """The permutation that changes nothing."""
    return torch.arange(size, dtype=torch.long, device=device)


def check_permutation(perm: torch.Tensor, size: int | None = None) -> None:
    """Raise ValueError unless `perm` is a 1-D bijection of range(size)."""
    if perm.dim() != 1 or perm.dtype.is_floating_point or perm.dtype == torch.bool:
        raise ValueError(f"A permutation must be a 1-D integer tensor, got {perm.dtype} of shape {tuple(perm.shape)}.")
    size = perm.numel() if size is None else size
    if perm.numel() != size:
        raise ValueError(f"Permutation has {perm.numel()} entries but the layer has {size} input channels.")
    if perm.is_meta:  # a placeholder before a checkpoint is loaded: no values to check yet
        return
    seen = torch.zeros(size, dtype=torch.bool, device=perm.device)
    if perm.numel() and (int(perm.min()) < 0 or int(perm.max()) >= size):
        raise ValueError(f"Permutation entries must lie in [0, {size}).")
    seen[perm.long()] = True
    if not bool(seen.all()):
        raise ValueError("Permutation repeats some channels and misses others: it is not a bijection.")


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    """The permutation `inv` with `perm[inv] == arange` (undoes a permutation)."""
    inv = torch.empty_like(perm, dtype=torch.long)
    inv[perm.long()] = torch.arange(perm.numel(), device=perm.device)
    return inv


def is_identity(perm: torch.Tensor) -> bool:
    """True when `perm` is range(len(perm))."""
    return bool(torch.equal(perm.long(), torch.arange(perm.numel(), device=perm.device)))


def compose(first: torch.Tensor, then: torch.Tensor) -> torch.Tensor:
    """The permutation equivalent to indexing with `first` and then with `then`: x[first][then]."""
    return first.long()[then.long()]


def head_shared_blocks(perm: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor | None:
    """The per-KV-head permutations [num_kv_heads, head_dim] that `perm` is made of, or None.

    `perm` permutes an attention output laid out as num_heads heads of head_dim channels, where query
    head h reads KV head h // (num_heads // num_kv_heads) (transformers' repeat_kv). It can be folded
    into the value projection only if it moves every channel inside its own head, the same way for all
    the query heads that share a KV head; then block g says how KV head g's channels are reordered.
    """
    if num_heads % num_kv_heads != 0 or perm.numel() % num_heads != 0:
        return None
    head_dim = perm.numel() // num_heads
    offsets = torch.arange(num_heads, device=perm.device).unsqueeze(1) * head_dim
    local = perm.long().reshape(num_heads, head_dim) - offsets
    if int(local.min()) < 0 or int(local.max()) >= head_dim:
        return None
    shared = local.reshape(num_kv_heads, num_heads // num_kv_heads, head_dim)
    return shared[:, 0].clone() if bool((shared == shared[:, :1]).all()) else None


def expand_head_blocks(blocks: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The full attention-output permutation whose `head_shared_blocks` are `blocks` [num_kv_heads, head_dim]."""
    num_kv_heads, head_dim = blocks.shape
    per_head = blocks.long().repeat_interleave(num_heads // num_kv_heads, dim=0)
    offsets = torch.arange(num_heads, device=blocks.device).unsqueeze(1) * head_dim
    return (per_head + offsets).reshape(-1)


def kv_rows_permutation(blocks: torch.Tensor) -> torch.Tensor:
    """The output-row permutation of the value projection ([num_kv_heads * head_dim] rows) for `blocks`."""
    num_kv_heads, head_dim = blocks.shape
    offsets = torch.arange(num_kv_heads, device=blocks.device).unsqueeze(1) * head_dim
    return (blocks.long() + offsets).reshape(-1)
