"""Collect each linear layer's input statistics in a decoder layer, and find which linears share an input."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..algorithms.statistics import InputStatistics
from .capture import CalibrationCache
from .structure import matches_any


@torch.no_grad()
def collect_statistics(layer: nn.Module, layer_index: int, cache: CalibrationCache, linears: dict[str, nn.Linear],
                       track_gram: bool) -> tuple[dict[str, InputStatistics], list[list[str]]]:
    """Run the layer on every cached batch; return per-group statistics and the groups.

    Linears called with the very same input tensor (q/k/v, gate/up, ...) form one group whose first
    member is the one called first; statistics are accumulated once, under that first member's name.
    """
    leader_of: dict[str, str] = {}
    stats: dict[str, InputStatistics] = {}
    seen: list[tuple[torch.Tensor, str]] = []  # inputs of this batch, held so their memory is not reused

    def hook(name):
        def record(module, args):
            x = args[0]
            leader = next((lead for tensor, lead in seen if tensor is x or _same_tensor(tensor, x)), None)
            if leader is None:
                seen.append((x, name))
                leader_of.setdefault(name, name)
                stats.setdefault(name, InputStatistics(x.shape[-1], track_gram=track_gram, device=x.device)).add_batch(x)
            else:
                leader_of.setdefault(name, leader)

        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in linears.items()]
    try:
        for hidden in cache.hidden:
            seen.clear()
            cache.call_for(layer_index, hidden).run(layer, hidden)
    finally:
        seen.clear()
        for handle in handles:
            handle.remove()
    unused = [name for name in linears if name not in leader_of]
    if unused:
        raise RuntimeError(f"Linear layers {unused} were never called during the calibration forward pass.")
    groups: dict[str, list[str]] = {leader: [leader] for leader in stats}
    for name in linears:
        if leader_of[name] != name:
            groups[leader_of[name]].append(name)
    return stats, list(groups.values())


def split_groups(stats: dict[str, InputStatistics], groups: list[list[str]],
                 own: Sequence[str]) -> tuple[dict[str, InputStatistics], list[list[str]]]:
    """Each member whose name matches `own` (whole dotted parts, as modules_to_not_convert) becomes a group of its
    own, reading its former group's statistics; the other members keep sharing theirs."""
    split_stats, split = {}, []
    for group in groups:
        alone = [name for name in group if matches_any(name, own)]
        rest = [name for name in group if name not in alone]
        for part in ([rest] if rest else []) + [[name] for name in alone]:
            split_stats[part[0]] = stats[group[0]]
            split.append(part)
    return split_stats, split


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two tensors viewing the same memory with the same layout."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
