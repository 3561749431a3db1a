"""The layer-by-layer pruning engine.

Capture the inputs of the first decoder layer, then for each layer in order: collect its input
statistics, decide permutations and masks per group of linears sharing an input, replace the linears
by PermutedSparseLinear, fold permutations where exact, and recompute the layer's outputs from the
PRUNED layer to feed the next one. Memory: one layer plus the calibration activations; a model kept
on the CPU can be pruned one layer at a time on a GPU by passing `device`, and so can a model that
accelerate offloads to the CPU (`offload.py` loads each layer and writes it back).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..nn.permuted_sparse_linear import PermutedSparseLinear
from .capture import CalibrationCache, capture
from .distributed import map_across_ranks
from .joint_training import JointResult, learn_jointly, prepare_training
from .offload import check_offload, execution_device, on_device, on_device_together
from .permutations import PERMUTATIONS
from .plan import PruningPlan
from .planning import GroupPlan, plan_group
from .preflight import check_finite_inputs, warn_few_tokens, warn_unhelpful_learning
from .statistics import collect_statistics, split_groups
from .structure import attention_heads, find_decoder_layers, layer_linears, set_submodule

logger = logging.getLogger(__name__)

LayerCallback = Callable[[int, dict], None]


@torch.no_grad()
def sparsify_layerwise(model: nn.Module, samples: torch.Tensor | None, plan: PruningPlan, progress: bool = True,
                       callback: LayerCallback | None = None, device=None, batch_size: int = 1) -> list[str]:
    """Prune every decoder linear of `model` in place as `plan` says; returns the qualified names of converted layers.

    `samples` are the calibration token ids [num_samples, seq_len]; None for a plan that reads no calibration
    data (`plan.needs_calibration` False: magnitude pruning without a permutation), which prunes each linear on
    its own weights.

    With the `model` scope, the permutations of the learned layers are first trained jointly
    (joint_training.py) once the layers before them are pruned, with all the learned layers held on `device`;
    the layers are then pruned in order with those permutations fixed.
    """
    prefix, layers = find_decoder_layers(model)
    check_offload(model, prefix, layers)
    model_device = execution_device(layers) or next(model.parameters()).device
    device = torch.device(device) if device is not None else model_device
    _check_samples(samples, model, plan)
    learned = plan.learned_layers(len(layers))
    warn_unhelpful_learning(plan)
    if samples is not None:
        warn_few_tokens(layer_linears(layers[0], plan.modules_to_not_convert), plan, samples.numel())
    heads = attention_heads(getattr(model, "config", None))
    converted: list[str] = []
    with _no_kv_cache(model):
        cache = None if samples is None else capture(model, layers, samples, batch_size, model_device)
        if cache is not None and device != model_device:
            cache = cache.to(device)
        targets = None
        if plan.joint and len(learned):
            targets = prepare_training(model, layers, samples, cache, plan, model_device, device)
        joint: JointResult | None = None
        bar = tqdm(range(len(layers)), desc="permllm: pruning layers", disable=not progress, unit="layer")
        for index in bar:
            start = time.perf_counter()
            if targets is not None and index == learned.start:
                with on_device_together(layers[index:], device):  # the learned layers run at every step
                    joint = learn_jointly(layers, index, cache, targets, plan, prefix, progress)
                targets = None
            layer = layers[index]
            layer_plan, fixed = _layer_plan(plan, index, learned, joint)
            with on_device(layer, device):  # an accelerate-offloaded layer is loaded, then written back
                names, info = _sparsify_layer(layer, index, cache, layer_plan, f"{prefix}.{index}", heads, fixed)
                if cache is not None:
                    cache.hidden = [cache.call_for(index, h).run(layer, h) for h in cache.hidden]
            converted += names
            if joint is not None and index == learned.start:
                info["joint"] = joint.info
            info["seconds"] = time.perf_counter() - start
            bar.set_postfix_str(_postfix(info))
            logger.info("layer %d: %s", index, _summary(info))
            if callback is not None:
                callback(index, info)
    return converted


def _layer_plan(plan: PruningPlan, index: int, learned: range, joint: JointResult | None):
    """The plan of one decoder layer and the permutations fixed for its groups (or None): layers that do not
    learn, and every layer when the joint training kept the heuristic start, take the heuristic permutation."""
    if not plan.learns:
        return plan, None
    if index not in learned:
        return plan.heuristic(), None
    if not plan.joint:
        return plan, None
    if joint is None or joint.perms is None:
        return plan.heuristic(), None
    return plan, joint.perms[index]


@torch.no_grad()
def _sparsify_layer(layer: nn.Module, index: int, cache: CalibrationCache | None, plan: PruningPlan,
                    qualified: str, heads=None, fixed: dict | None = None) -> tuple[list[str], dict]:
    """Prune one decoder layer in place; returns the converted names and what was decided per group.
    `fixed` {group (linear names): permutation} prunes those groups in a permutation chosen beforehand."""
    linears = layer_linears(layer, plan.modules_to_not_convert, layer_name=qualified)
    for name, linear in linears.items():
        plan.pattern.check_width(linear.in_features, f"{qualified}.{name}.in_features")
    stats, groups = _groups(layer, index, cache, linears, plan, qualified)
    head_shaped = _head_shaped_groups(layer, heads, groups, plan)
    if fixed is not None and set(fixed) != set(map(tuple, groups)):
        raise RuntimeError(f"{qualified}: the jointly learned permutations are for the groups {sorted(fixed)}, but "
                           f"the layer's groups are {sorted(map(tuple, groups))}.")

    def plan_one(group):  # groups are independent, so under torch.distributed each rank plans a share
        weights = {name: linears[name].weight for name in group}
        group_heads = heads[:2] if group[0] in head_shaped else None
        perm = fixed[tuple(group)] if fixed is not None else None
        return plan_group(weights, stats[group[0]], plan, heads=group_heads, perm=perm)

    decided = dict(zip(map(tuple, groups), map_across_ranks(plan_one, groups)))
    _warn_unconverged(qualified, decided)
    for group, group_plan in decided.items():
        _replace_group(layer, linears, group, group_plan, plan)
    if plan.fold_permutations and cache is not None:
        from .folding import fold_layer_permutations

        fold_layer_permutations(layer, index, cache, heads, groups, prefix=f"{qualified}.")
    info = {"groups": {"+".join(group): group_plan.info for group, group_plan in decided.items()}}
    return [f"{qualified}.{name}" for name in linears], info


def _groups(layer: nn.Module, index: int, cache: CalibrationCache | None, linears: dict[str, nn.Linear],
            plan: PruningPlan, qualified: str):
    """The layer's groups of linears planned together, and each group's input statistics (by its first member):
    the linears that read one input, split as `plan.own_permutation` says; each linear alone, without
    statistics, when there is no calibration data."""
    if cache is None:
        return {name: None for name in linears}, [[name] for name in linears]
    stats, groups = collect_statistics(layer, index, cache, linears, plan.needs_gram)
    check_finite_inputs({name: s.sum_squares for name, s in stats.items()}, qualified)
    if plan.own_permutation:
        stats, groups = split_groups(stats, groups, plan.own_permutation)
    return stats, groups


def _warn_unconverged(qualified: str, decided: dict) -> None:
    """Name the linears whose lsq refit left rows at the iteration cap (their error is above its optimum)."""
    from ..algorithms.refit import MAX_ITERATIONS

    stopped = {name: sum(fit["unconverged_rows"] for fit in fits) for group_plan in decided.values()
               for name, fits in group_plan.info.get("refit", {}).items()}
    stopped = {name: rows for name, rows in stopped.items() if rows}
    if stopped:
        shown = ", ".join(f"{qualified}.{name} ({rows} rows)" for name, rows in stopped.items())
        logger.warning("lsq: the refit of %s stopped at %d iterations before reaching its tolerance; those rows are "
                       "less accurate than they could be. A larger damp (PermLLMConfig(damp=...)) makes the problem "
                       "easier to solve.", shown, MAX_ITERATIONS)


def _head_shaped_groups(layer: nn.Module, heads, groups, plan: PruningPlan) -> set[str]:
    """With fold_permutations="all": attention-output groups whose heuristic permutation is chosen inside
    heads, so that it folds into v_proj (a free permutation is more accurate: research/FINDINGS.md)."""
    inside_heads = PERMUTATIONS[plan.permutation].inside_heads
    if heads is None or plan.fold_permutations != "all" or not inside_heads or heads[2] % plan.pattern.m:
        return set()
    from .folding import head_fold_candidates

    return {consumer for consumer, _ in head_fold_candidates(layer, heads, groups) if [consumer] in groups}


def _replace_group(layer, linears, group, group_plan: GroupPlan, plan: PruningPlan) -> None:
    n, m = plan.pattern.n, plan.pattern.m
    for name in group:
        sparse = PermutedSparseLinear.from_linear(linears[name], n, m, mask=group_plan.masks[name],
                                                  perm=group_plan.perm, weight=group_plan.weights[name])
        set_submodule(layer, name, sparse)


def _postfix(info: dict) -> str:
    """Progress-bar text: seconds per layer and, for learned permutations, the summed loss before -> after."""
    text = f"{info['seconds']:.1f}s/layer"
    groups = [g for g in info["groups"].values() if "learned_loss" in g]
    if groups:
        before, after = sum(g["init_loss"] for g in groups), sum(g["learned_loss"] for g in groups)
        text += f", loss {before:.4g}->{after:.4g}"
    return text


def _summary(info: dict) -> str:
    parts = []
    for group, stats in info["groups"].items():
        text = ", ".join(f"{k}={v:.4g}" for k, v in stats.items() if isinstance(v, float))
        parts.append(f"{group}[{text}]")
    return "; ".join(parts) + f" ({info.get('seconds', 0):.1f}s)"


def _check_samples(samples: torch.Tensor | None, model: nn.Module, plan: PruningPlan) -> None:
    if samples is None:
        if plan.needs_calibration:
            raise ValueError(f"metric={plan.metric!r} with permutation={plan.permutation!r} needs calibration samples "
                             "(a LongTensor [num_samples, seq_len]); only magnitude pruning without a permutation "
                             "runs without them.")
        return
    if not isinstance(samples, torch.Tensor) or samples.dim() != 2 or samples.numel() == 0:
        raise ValueError("Calibration samples must be a non-empty LongTensor [num_samples, seq_len].")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and int(samples.max()) >= vocab:
        raise ValueError(
            f"Calibration token id {int(samples.max())} is outside the model's vocabulary ({vocab}): "
            "the tokenizer does not belong to this model."
        )


class _no_kv_cache:
    """Turn off the model's KV cache while calibrating, and restore the setting after."""

    def __init__(self, model: nn.Module):
        self.config = getattr(model, "config", None)

    def __enter__(self):
        self.previous = getattr(self.config, "use_cache", None)
        if self.config is not None:
            self.config.use_cache = False

    def __exit__(self, *exc):
        if self.config is not None and self.previous is not None:
            self.config.use_cache = self.previous
