"""Fold input permutations into the layers that produce those inputs, where that is exact.

A linear's input permutation can move into the output rows of the linears that produce its input
(down_proj's into gate/up, fc2's into fc1): permuting output rows keeps their own N:M pattern intact.
Candidates are found from the structure (same parent module, matching widths) and every fold is
checked on real calibration data; a fold that changes the layer's output is undone, so anything that
cannot be shown safe keeps its run-time gather.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..nn.permuted_sparse_linear import PermutedSparseLinear
from ..sparse.permutation import identity_permutation, invert_permutation
from .capture import CalibrationCache

logger = logging.getLogger(__name__)


@torch.no_grad()
def permute_output_rows(module: nn.Module, perm: torch.Tensor) -> None:
    """Reorder the output features of a (sparse or dense) linear: out_new[j] = out_old[perm[j]]."""
    perm = perm.to(module.weight.device)
    if isinstance(module, PermutedSparseLinear):
        module.weight_mask.data = module.weight_mask.data[perm]
    module.weight.data = module.weight.data[perm]
    if module.bias is not None:
        module.bias.data = module.bias.data[perm]
    if isinstance(module, PermutedSparseLinear):
        module.invalidate_cache()


def mlp_fold_candidates(layer: nn.Module) -> list[tuple[str, list[str]]]:
    """(consumer, producers) pairs: a permuted linear and the other linears of its parent module whose
    output width equals its input width (gate/up -> down, fc1 -> fc2)."""
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, (nn.Linear, PermutedSparseLinear))}
    pairs = []
    for name, module in linears.items():
        if not isinstance(module, PermutedSparseLinear) or module.has_identity_perm():
            continue
        parent = name.rpartition(".")[0]
        producers = [other for other, m in linears.items()
                     if other != name and other.rpartition(".")[0] == parent and m.out_features == module.in_features
                     and _reads_other_input(linears[other], module)]
        if producers:
            pairs.append((name, producers))
    return pairs


def _reads_other_input(producer: nn.Module, consumer: PermutedSparseLinear) -> bool:
    """A producer cannot be one of the consumer's own input siblings (same width in and out)."""
    return producer.in_features != consumer.in_features or producer.out_features != consumer.out_features


@torch.no_grad()
def fold_layer_permutations(layer: nn.Module, index: int, cache: CalibrationCache) -> list[str]:
    """Fold every verifiable input permutation of `layer` into its producers; returns the folded consumers."""
    if not cache.hidden:
        return []
    sample = cache.hidden[0]
    call = cache.call_for(index, sample)
    reference = call.run(layer, sample)
    folded = []
    for consumer_name, producers in mlp_fold_candidates(layer):
        consumer = layer.get_submodule(consumer_name)
        perm = consumer.input_perm.clone()
        for name in producers:
            permute_output_rows(layer.get_submodule(name), perm)
        consumer.input_perm.data = identity_permutation(perm.numel(), perm.device)
        consumer.invalidate_cache()
        if _same_output(call.run(layer, sample), reference):
            folded.append(consumer_name)
            continue
        inverse = invert_permutation(perm)  # undo: the fold changed the layer's function
        for name in producers:
            permute_output_rows(layer.get_submodule(name), inverse)
        consumer.input_perm.data = perm
        consumer.invalidate_cache()
    if folded:
        logger.info("layer %d: folded the input permutation of %s into its producers", index, ", ".join(folded))
    return folded


def _same_output(output: torch.Tensor, reference: torch.Tensor) -> bool:
    scale = reference.abs().max().clamp_min(1e-6)
    tolerance = 8 * torch.finfo(reference.dtype).eps * scale
    return bool(((output - reference).abs().max() <= tolerance).item())
