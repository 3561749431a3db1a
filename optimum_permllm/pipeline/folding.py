"""Fold input permutations into the modules that produce those inputs, where that is exact.

- Into linears: a linear's input permutation moves into the output rows of the linears that produce
  its input (down_proj's into gate/up, fc2's into fc1); permuting output rows keeps their N:M pattern.
- Into norms: q/k/v (or gate/up, fc1) read a norm's output; the norm is wrapped in a
  PermutedOutputNorm that writes its output already permuted, and the group skips its gather.
- Into value rows: an attention output projection (o_proj, out_proj) whose permutation keeps every
  channel inside its head, alike for the query heads of one KV head, moves into v_proj's rows (the
  attention output of a head is a weighted sum of its value rows, so it comes out permuted).
Candidates are found from the structure (same parent module and matching widths; the module whose
output tensor is the group's input) and every fold is checked on real calibration data: a fold that
changes the layer's output is undone, so anything that cannot be shown safe keeps its run-time gather.
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from torch import nn

from ..nn.permuted_norm import PermutedOutputNorm
from ..nn.permuted_sparse_linear import PermutedSparseLinear
from ..sparse.permutation import (head_shared_blocks, identity_permutation, invert_permutation,
                                  kv_rows_permutation)
from .capture import CalibrationCache
from .structure import set_submodule

logger = logging.getLogger(__name__)


@torch.no_grad()
def permute_output_rows(module: nn.Module, perm: torch.Tensor) -> None:
    """Reorder the output features of a (sparse or dense) linear: out_new[j] = out_old[perm[j]]."""
    if isinstance(module, PermutedSparseLinear):
        module.permute_output_rows(perm)
        return
    perm = perm.to(module.weight.device)
    module.weight.data = module.weight.data[perm]
    if module.bias is not None:
        module.bias.data = module.bias.data[perm]


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


def head_fold_candidates(layer: nn.Module, heads: tuple[int, int, int] | None,
                         groups: list[list[str]]) -> list[tuple[str, list[str]]]:
    """(consumer, producers) pairs: a linear reading num_heads * head_dim channels and its siblings that
    write num_kv_heads * head_dim channels from another input (v_proj, and k_proj, which the check rejects)."""
    if heads is None:
        return []
    num_heads, num_kv_heads, head_dim = heads
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, (nn.Linear, PermutedSparseLinear))}
    group_of = {name: tuple(group) for group in groups for name in group}
    pairs = []
    for name, module in linears.items():
        if module.in_features != num_heads * head_dim:
            continue
        parent = name.rpartition(".")[0]
        producers = [other for other, m in linears.items()
                     if other.rpartition(".")[0] == parent and m.out_features == num_kv_heads * head_dim
                     and group_of.get(other, (other,)) != group_of.get(name, (name,))]
        if producers:
            pairs.append((name, producers))
    return pairs


def _reads_other_input(producer: nn.Module, consumer: PermutedSparseLinear) -> bool:
    """A producer cannot be one of the consumer's own input siblings (same width in and out)."""
    return producer.in_features != consumer.in_features or producer.out_features != consumer.out_features


@torch.no_grad()
def fold_layer_permutations(layer: nn.Module, index: int, cache: CalibrationCache,
                            heads: tuple[int, int, int] | None = None, groups: list[list[str]] = (),
                            prefix: str = "") -> list[str]:
    """Fold every verifiable input permutation of `layer` into its producers; returns the folded consumers.

    `heads` (num_heads, num_kv_heads, head_dim) and the layer's input-sharing `groups` enable the fold of
    head-shaped attention-output permutations into the value projection. `prefix` is the layer's name in
    the model plus a dot: a permuted norm records its readers as `prefix + name`.
    """
    if not cache.hidden:
        return []
    sample = cache.hidden[0]
    call = cache.call_for(index, sample)
    reference = call.run(layer, sample)

    def check() -> bool:
        return _same_output(call.run(layer, sample), reference)

    folded = _fold_into_linears(layer, check)
    folded += _fold_into_norms(layer, call, sample, check, prefix)
    folded += _fold_into_values(layer, head_fold_candidates(layer, heads, list(groups)), heads, check)
    if folded:
        logger.info("layer %d: folded the input permutation of %s into its producers", index, ", ".join(folded))
    return folded


def _kept_if_exact(apply, undo, check) -> bool:
    """Apply a fold and keep it when `check()` finds the layer's output unchanged; otherwise undo it."""
    apply()
    if check():
        return True
    undo()
    return False


def _fold_into_linears(layer: nn.Module, check) -> list[str]:
    """Move each permuted linear's input permutation into the output rows of its producers (gate/up, fc1)."""
    folded = []
    for consumer_name, producers in mlp_fold_candidates(layer):
        consumer = layer.get_submodule(consumer_name)
        perm = consumer.input_perm.clone()
        identity = identity_permutation(perm.numel(), perm.device)
        apply = partial(_move_rows, layer, producers, perm, [consumer], identity)
        undo = partial(_move_rows, layer, producers, invert_permutation(perm), [consumer], perm)
        if _kept_if_exact(apply, undo, check):
            folded.append(consumer_name)
    return folded


def _fold_into_values(layer: nn.Module, pairs, heads, check) -> list[str]:
    """Move head-shaped attention-output permutations into the rows of the producer that verifies (v_proj)."""
    folded = []
    for consumer_name, producers in pairs:
        consumer = layer.get_submodule(consumer_name)
        if not isinstance(consumer, PermutedSparseLinear) or consumer.has_identity_perm():
            continue
        perm = consumer.input_perm.clone()
        blocks = head_shared_blocks(perm, heads[0], heads[1])
        if blocks is None:
            continue
        rows = kv_rows_permutation(blocks)
        identity = identity_permutation(perm.numel(), perm.device)
        for name in producers:  # the first producer whose fold verifies (v_proj, not k_proj)
            apply = partial(_move_rows, layer, [name], rows, [consumer], identity)
            undo = partial(_move_rows, layer, [name], invert_permutation(rows), [consumer], perm)
            if _kept_if_exact(apply, undo, check):
                folded.append(consumer_name)
                break
    return folded


def _move_rows(layer: nn.Module, producers: list[str], rows: torch.Tensor, consumers, consumer_perm) -> None:
    """Permute the producers' output rows by `rows` and set the consumers' input permutation."""
    for name in producers:
        permute_output_rows(layer.get_submodule(name), rows)
    _set_input_perms(consumers, consumer_perm)


def _fold_into_norms(layer: nn.Module, call, sample: torch.Tensor, check, prefix: str = "") -> list[str]:
    """Wrap each norm that feeds a permuted group in a PermutedOutputNorm, keeping only exact folds."""
    folded = []
    for norm_name, consumers in norm_consumers(layer, lambda: call.run(layer, sample)).items():
        modules = [layer.get_submodule(c) for c in consumers]
        if not all(isinstance(c, PermutedSparseLinear) for c in modules):
            continue
        perm = modules[0].input_perm.clone()
        if modules[0].has_identity_perm() or not all(torch.equal(c.input_perm, perm) for c in modules):
            continue
        norm = layer.get_submodule(norm_name)
        identity = identity_permutation(perm.numel(), perm.device)
        wrapped = PermutedOutputNorm(norm, perm, readers=tuple(prefix + c for c in consumers))
        apply = partial(_swap_norm, layer, norm_name, wrapped, modules, identity)
        undo = partial(_swap_norm, layer, norm_name, norm, modules, perm)
        if _kept_if_exact(apply, undo, check):
            folded += consumers
    return folded


@torch.no_grad()
def norm_consumers(root: nn.Module, run) -> dict[str, list[str]]:
    """Which linears read each norm's output, found by running `run()` with hooks (tensor identity).

    Only norms whose output is read by linears and nothing else that was hooked are returned; whether
    the output also reaches other code is settled by the caller's check of the outputs.
    """
    outputs: dict[int, str] = {}
    readers: dict[str, list[str]] = {}
    kept_alive = []  # norm outputs stay referenced so no later tensor can reuse their id

    def record_output(module, args, out, name):
        kept_alive.append(out)
        outputs[id(out)] = name

    handles = []
    for name, module in root.named_modules():
        if _is_norm(module):
            handles.append(module.register_forward_hook(lambda mod, args, out, name=name: record_output(mod, args, out, name)))
        elif isinstance(module, (nn.Linear, PermutedSparseLinear)):
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, name=name: readers.setdefault(outputs.get(id(args[0]), ""), []).append(name)))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    readers.pop("", None)
    return {norm: sorted(set(names)) for norm, names in readers.items()}


def _is_norm(module: nn.Module) -> bool:
    """Norm layers: nn.LayerNorm, a PermutedOutputNorm, or a transformers class named *Norm."""
    name = type(module).__name__
    return isinstance(module, (nn.LayerNorm, PermutedOutputNorm)) or name.endswith(("RMSNorm", "LayerNorm", "Norm"))


def _swap_norm(layer: nn.Module, name: str, norm: nn.Module, consumers, consumer_perm) -> None:
    """Put `norm` at `name` and set the input permutation of the linears that read it."""
    set_submodule(layer, name, norm)
    _set_input_perms(consumers, consumer_perm)


def _set_input_perms(modules: list[PermutedSparseLinear], perm: torch.Tensor) -> None:
    for module in modules:
        module.set_input_perm(perm)


# A fold only reorders sums, so an exact fold differs by rounding: on Gemma 3 270M in float32 up to 11 eps of the
# output's largest value, a wrong fold by at least 1.6e5 eps (research/FINDINGS.md). 1e-5 (84 float32 eps) sits
# between; half-precision outputs keep 8 of their own eps.
FOLD_TOLERANCE = 1e-5


def _same_output(output: torch.Tensor, reference: torch.Tensor) -> bool:
    """The layer's output after a fold equals the reference within rounding (FOLD_TOLERANCE of its largest value)."""
    scale = reference.abs().max().clamp_min(1e-6)
    tolerance = max(8 * torch.finfo(reference.dtype).eps, FOLD_TOLERANCE) * scale
    return bool(((output - reference).abs().max() <= tolerance).item())
