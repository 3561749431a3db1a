"""Work across torch.distributed ranks: independent problems split round robin (layer-parallel planning), and
the sums of data-parallel training (the `model` scope).

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


def rank_and_world(group=None) -> tuple[int, int]:
    """(this process's rank, number of ranks); (0, 1) without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_reduce_sum_(tensors: Sequence[torch.Tensor], group=None) -> None:
    """Sum `tensors` in place over all ranks (one flat all-reduce); nothing to do in one process."""
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    for tensor, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        tensor.copy_(part.view_as(tensor))
