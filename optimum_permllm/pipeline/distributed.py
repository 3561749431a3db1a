"""Layer-parallel permutation learning: independent problems split across torch.distributed ranks.

Rank r solves the problems r, r + world, r + 2 world, ... and every rank all-gathers every result, so
all ranks end with the same list as one process would compute (each problem is deterministic for its
own seed and does not depend on which rank solves it). Without an initialised process group (or with
one rank) it is a plain in-order map.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

Item = TypeVar("Item")
Result = TypeVar("Result")


def is_distributed() -> bool:
    """True when a torch.distributed process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def map_across_ranks(fn: Callable[[Item], Result], items: Sequence[Item], group=None) -> list[Result]:
    """[fn(item) for item in items], each item computed on one rank (round robin), gathered on all ranks.

    Every rank must call this with the same items in the same order. Results travel by
    `all_gather_object` (pickled), so they must be picklable; tensors come back on the CPU.
    """
    if not is_distributed():
        return [fn(item) for item in items]
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    mine = {i: _to_cpu(fn(items[i])) for i in range(rank, len(items), world)}
    gathered: list[dict[int, Result] | None] = [None] * world
    dist.all_gather_object(gathered, mine, group=group)
    merged = {i: result for share in gathered for i, result in share.items()}
    return [merged[i] for i in range(len(items))]


def _to_cpu(value):
    """`value` with every tensor inside dataclasses, dicts, lists and tuples moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        for name in value.__dataclass_fields__:
            setattr(value, name, _to_cpu(getattr(value, name)))
    return value
