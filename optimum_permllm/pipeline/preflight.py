"""Checks run before a prune changes anything: the device, finite weights and inputs, the learned block sizes
used, and whether the calibration is large enough for the least-squares refit."""

from __future__ import annotations

import logging

import torch
from torch import nn

from .metrics import METRICS
from .plan import PruningPlan
from ..algorithms.learned.parametrisation import block_size_for

logger = logging.getLogger(__name__)


def check_device(device) -> torch.device:
    """`device` as a torch.device, refused with a clear error when it names no device or none this machine has
    (torch's own error would be a bare AssertionError, "Torch not compiled with CUDA enabled")."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{device!r} is not a device: use 'cpu', 'cuda', 'cuda:1', ...") from error
    backend = getattr(torch, parsed.type, None) if parsed.type != "cpu" else None
    if backend is None or not hasattr(backend, "is_available"):  # the CPU, or a backend that cannot say
        return parsed
    count = backend.device_count() if backend.is_available() and hasattr(backend, "device_count") else 0
    if not backend.is_available() or (parsed.index is not None and count and parsed.index >= count):
        found = (f"this machine has {count} {parsed.type} device(s)" if count else
                 f"torch.{parsed.type}.is_available() is False (no such device, or a torch built without it)")
        raise ValueError(f"device {str(parsed)!r} is not available: {found}. Use the CPU (device 'cpu', "
                         "`--device cpu`), or run where that device is.")
    return parsed


@torch.no_grad()
def check_finite_weights(linears: dict[str, nn.Linear]) -> None:
    """Refuse NaN or infinite weights (they would be pruned silently into NaN logits), naming layer and tensor."""
    for name, linear in linears.items():
        for key in ("weight", "bias"):
            tensor = getattr(linear, key, None)
            if tensor is not None and not tensor.is_meta and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise ValueError(f"{name}.{key} has {bad} NaN or infinite values: the model cannot be pruned. "
                                 "Load it again from its checkpoint, or leave this layer dense (modules_to_not_convert).")


def check_finite_inputs(sum_squares: dict[str, torch.Tensor], prefix: str) -> None:
    """Refuse calibration inputs with NaN or infinite values (seen through their per-feature sums of squares)."""
    for name, sums in sum_squares.items():
        if not bool(torch.isfinite(sums).all()):
            raise ValueError(
                f"The calibration inputs of {prefix}.{name} contain NaN or infinite values: some weight before "
                "this layer (a norm, an embedding) is not finite, or the activations overflow in this dtype. "
                "Check the model's weights, or prune in float32."
            )


def warn_block_sizes(linears: dict[str, nn.Linear], plan: PruningPlan) -> None:
    """Say which layers learn their permutation with a smaller block than `block_size` (it must divide the width)."""
    if not plan.learns:
        return
    block_size = plan.learning.block_size
    used = {name: block_size_for(linear.in_features, block_size, plan.pattern.m) for name, linear in linears.items()}
    other = {name: size for name, size in used.items() if size != block_size}
    if other:
        shown = ", ".join(f"{name} (in_features={linears[name].in_features}: block {size})"
                          for name, size in list(other.items())[:3])
        more = f" and {len(other) - 3} more" if len(other) > 3 else ""
        logger.warning("block_size=%d does not divide the input width of %s%s; those layers use the largest block "
                       "size that does.", block_size, shown, more)


def warn_few_tokens(linears: dict[str, nn.Linear], plan: PruningPlan, tokens: int) -> None:
    """Say when the metric (lsq) refits layers wider than the calibration can support (`Metric.tokens_per_input`):
    it damps them more (the refit's dampening is estimated from the data), and more calibration tokens would make
    them more accurate."""
    per_input = METRICS[plan.metric].tokens_per_input
    if not per_input or not linears:
        return
    widest = max(linear.in_features for linear in linears.values())
    if tokens < per_input * widest:
        logger.warning(
            "%s refits %d kept weights per row of the widest layer (%d inputs) on only %d calibration tokens: with "
            "fewer than %d tokens per input the refit fits the calibration text more than the layer and gains little "
            "on other text. Calibrate on at least %d tokens (num_samples x seq_len) for its full accuracy.",
            plan.metric, widest * plan.pattern.n // plan.pattern.m, widest, tokens, per_input, per_input * widest)


def warn_unhelpful_learning(plan: PruningPlan) -> None:
    """Say when the learned permutation has measured worse on held-out text than the heuristic it starts from,
    and what to use instead: the `layer` scope with any metric (it lowers each group's calibration error only),
    and the `model` scope with a metric that ships masks other than the score masks it trains (`gram`, `lsq`,
    `sparsegpt`)."""
    if not plan.learns:
        return
    if not plan.joint:
        logger.warning(
            "permutation='learned' with scope='layer' lowers each layer group's error on the calibration text, but "
            "in the measurements so far it was worse on held-out text than permutation='heuristic', its starting "
            "point, at several times its pruning time (BENCHMARKS.md). scope='model' (PermLLM's joint training) "
            "measured better than the heuristic with metric='wanda'; permutation='heuristic' is the fast choice.")
    elif not METRICS[plan.metric].ships_score_mask:
        logger.warning(
            "permutation='learned' with scope='model' trains the permutations on the score masks, which "
            "metric=%r then replaces by masks of its own choosing; with metric='gram' and metric='lsq' it was no "
            "better on held-out text than permutation='heuristic' with the same metric, on both models measured, "
            "at two to four times the pruning time (BENCHMARKS.md, \"Joint training\"). Use "
            "permutation='heuristic' with %s; the joint training measured better than the heuristic with "
            "metric='wanda'.", plan.metric, plan.metric)
