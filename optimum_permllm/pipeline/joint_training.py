"""The `model` scope: every permutation of the learned decoder layers trained together (PermLLM as published).

From the heuristic permutations, AdamW trains the block permutations of every group of the learned layers at
once, on one loss: 1 - cosine similarity between the sparse stack's last hidden states and the dense model's,
per calibration window (the paper's). Each step draws a batch of training windows; under torch.distributed
every rank runs its share of the batch and the block gradients are summed over ranks, so all ranks take the
same step. A share of the calibration windows is held out: the hard permutations are scored on it at the
start and `evaluations` times during the run, and the best is returned (None when the start was best: the
caller then prunes with the heuristic exactly as without learning). The caller runs the layer-by-layer
pruning with the returned permutations fixed, so its masks and weight updates are computed on them.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..algorithms.learned import block_size_for, cosine_loss, feature_scale
from ..algorithms.learned.optimisation import BestTracker, make_optimizer, temperature
from ..algorithms.scores import score_fn
from .capture import CalibrationCache, capture
from .distributed import all_reduce_sum_, rank_and_world
from .joint_forward import JointPermutations, LearnedGroup, SparseStack
from .metrics import METRICS
from .offload import on_device
from .permutations import heuristic_order
from .plan import PruningPlan
from .preflight import check_finite_inputs
from .statistics import collect_statistics
from .structure import layer_linears

logger = logging.getLogger(__name__)


@dataclass
class JointResult:
    """The learned permutations {layer index: {group (linear names): perm}}, or None when the heuristic start
    scored best on the held-out windows; and what happened (losses, steps, time)."""

    perms: dict[int, dict[tuple[str, ...], torch.Tensor]] | None
    info: dict = field(default_factory=dict)


@torch.no_grad()
def prepare_training(model: nn.Module, layers: nn.ModuleList, samples: torch.Tensor, cache: CalibrationCache,
                     plan: PruningPlan, model_device, device) -> torch.Tensor:
    """Before any layer is pruned: record how every layer is called at the batch sizes the training runs (attention
    masks and position embeddings depend on the batch shape; one short forward of the model per size), and return
    the dense model's last hidden states on every cached window, [windows, tokens, hidden] (the training target).
    Each layer runs on `device` (loaded there if offloaded or elsewhere), one at a time."""
    for size in sorted(call_sizes(plan, samples.shape[0]) - {size for _, size in cache.calls}):
        calls = capture(model, layers, samples[:size], size, model_device)
        cache.calls.update(calls.to(device).calls)
    hidden = list(cache.hidden)
    for index, layer in enumerate(layers):
        with on_device(layer, device):
            hidden = [cache.call_for(index, h).run(layer, h) for h in hidden]
    return torch.cat(hidden)


def call_sizes(plan: PruningPlan, count: int) -> set[int]:
    """The numbers of windows this rank runs at once, out of `count` calibration windows: its micro-batches of a
    training batch and of the held-out windows."""
    settings = plan.learning
    train, heldout = split_windows(count, settings.heldout_share)
    batch = list(range(min(settings.batch_size, len(train))))
    return {len(chunk) for windows in (batch, heldout) for chunk in rank_chunks(windows, settings.micro_batch)}


def rank_chunks(windows: list[int], micro: int) -> list[list[int]]:
    """This rank's share of `windows` (round robin over ranks), in micro-batches of at most `micro`."""
    rank, world = rank_and_world()
    mine = windows[rank::world]
    return [mine[i:i + micro] for i in range(0, len(mine), micro)]


def learn_jointly(layers: nn.ModuleList, first: int, cache: CalibrationCache, targets: torch.Tensor,
                  plan: PruningPlan, prefix: str, progress: bool = True) -> JointResult:
    """Learn the permutations of layers `first..` together. `cache` holds the inputs of layer `first` (the
    layers before it already pruned) and the calls recorded by `prepare_training`, `targets` the dense last
    hidden states of the same windows. The layers `first..` must be on the device of `cache`."""
    settings = plan.learning.resolved(METRICS[plan.metric].score)
    groups = prepare_groups(layers, first, cache, plan, prefix)
    stack = SparseStack(layers[first:], first, groups, plan.pattern, METRICS[plan.metric].score, settings.checkpointing)
    inputs = torch.cat(cache.hidden)
    device = inputs.device
    perms = JointPermutations(groups, settings, torch.Generator().manual_seed(settings.seed)).to(device)
    train, heldout = split_windows(inputs.shape[0], settings.heldout_share)
    scale = feature_scale(targets) if settings.standardise else None
    run = _Runner(stack, inputs, targets, scale, cache.calls, range(first, len(layers)), settings.micro_batch)
    optimizer, schedule = make_optimizer(perms.blocks, settings.optimizer, settings.lr, settings.weight_decay,
                                         settings.steps)
    batches = _batches(train, min(settings.batch_size, len(train)), settings.seed)
    every = max(1, math.ceil(settings.steps / settings.evaluations))
    tracker, train_losses, step_seconds = BestTracker(), [], []
    slots = perms.hard_slots()
    start = run.evaluate(perms.forward_blocks(slots, None), heldout)
    tracker.update(perms.perms(slots), start, step=0)
    _announce(first, len(layers), groups, train, heldout, start, progress)
    bar = tqdm(range(settings.steps), desc="permllm: joint permutations", unit="step", leave=False,
               disable=not progress or rank_and_world()[0] != 0)
    for step in bar:
        began = time.perf_counter()
        tau = temperature(step, settings.steps, settings.tau)
        train_losses.append(run.train_step(perms, slots, tau, next(batches), optimizer))
        schedule.step()
        slots = perms.hard_slots()
        step_seconds.append(time.perf_counter() - began)
        if (step + 1) % every == 0 or step + 1 == settings.steps:
            tracker.update(perms.perms(slots), run.evaluate(perms.forward_blocks(slots, None), heldout), step + 1)
        bar.set_postfix_str(f"loss {train_losses[-1]:.5f}, held-out {tracker.history[-1]:.5f} (best {tracker.best_loss:.5f})")
    bar.close()
    info = {"first_layer": first, "layers": len(layers) - first, "groups": len(groups), "steps": settings.steps,
            "train_windows": len(train), "heldout_windows": len(heldout), "start_loss": start,
            "best_loss": tracker.best_loss, "best_step": tracker.best_step, "heldout_history": tracker.history,
            "train_losses": train_losses,
            "seconds_per_step": sum(step_seconds) / len(step_seconds) if step_seconds else 0.0}
    logger.info("joint permutations: held-out loss %.6f at the heuristic start, best %.6f after %d of %d steps%s",
                start, tracker.best_loss, tracker.best_step, settings.steps,
                " (the heuristic permutation is kept)" if tracker.best_step == 0 else "")
    if tracker.best_step == 0:
        return JointResult(None, info)
    table: dict[int, dict[tuple[str, ...], torch.Tensor]] = {}
    for group, perm in zip(groups, tracker.best):
        table.setdefault(group.layer, {})[group.names] = perm.cpu()
    return JointResult(table, info)


@torch.no_grad()
def prepare_groups(layers: nn.ModuleList, first: int, cache: CalibrationCache, plan: PruningPlan,
                   prefix: str) -> list[LearnedGroup]:
    """Every group of linears sharing an input in layers `first..`, with its score's per-input factor and its
    heuristic permutation, layer by layer: each layer's statistics come from the layers before it pruned with
    their heuristic permutation and score mask (the model the training starts from, calibrated layer by layer
    as Wanda is), the inputs of `first` from `cache`."""
    hidden, groups = list(cache.hidden), []
    metric, m = METRICS[plan.metric], plan.pattern.m
    for index in range(first, len(layers)):
        layer = layers[index]
        linears = layer_linears(layer, list(plan.modules_to_not_convert), layer_name=f"{prefix}.{index}")
        for name, linear in linears.items():
            plan.pattern.check_width(linear.in_features, f"{prefix}.{index}.{name}.in_features")
        stats, found = collect_statistics(layer, index, CalibrationCache(hidden, cache.calls), linears,
                                          track_gram=metric.needs_gram)
        check_finite_inputs({name: s.sum_squares for name, s in stats.items()}, f"{prefix}.{index}")
        new = []
        for names in found:
            norms = metric.input_weights(stats[names[0]], plan.damp)
            scores = torch.cat([score_fn(metric.score)(linears[name].weight, norms) for name in names])
            block = block_size_for(scores.shape[1], plan.learning.block_size, m)
            new.append(LearnedGroup(index, tuple(names), norms, heuristic_order(scores, plan.pattern), block))
        groups += new
        start = SparseStack([layer], index, new, plan.pattern, METRICS[plan.metric].score, checkpointing=False)
        identity = [torch.eye(g.block_size, device=g.init_perm.device).expand(g.init_perm.numel() // g.block_size, -1, -1)
                    for g in new]
        hidden = [start(h, identity, {index: cache.call_for(index, h)}) for h in hidden]
    if not groups:
        raise ValueError(f"No linear layer to learn a permutation for in {prefix}.{first}..{len(layers) - 1} "
                         "(all left dense by modules_to_not_convert?).")
    return groups


def split_windows(count: int, heldout_share: float) -> tuple[list[int], list[int]]:
    """(training windows, held-out windows): the last round(count * share) windows (at least one) are held out;
    with a single window, or share 0, the best permutation is chosen on the training windows themselves."""
    held = min(count - 1, max(1, round(count * heldout_share))) if heldout_share > 0 else 0
    train = list(range(count - held))
    return train, (list(range(count - held, count)) if held else train)


def _batches(train: list[int], size: int, seed: int):
    """An endless stream of batches of `size` training windows: each pass over them in a new seeded order."""
    generator = torch.Generator().manual_seed(seed)
    pending: list[int] = []
    while True:
        while len(pending) < size:
            pending += [train[i] for i in torch.randperm(len(train), generator=generator).tolist()]
        yield pending[:size]
        pending = pending[size:]


class _Runner:
    """Forward passes of the sparse stack over windows, split over ranks and micro-batches."""

    def __init__(self, stack: SparseStack, inputs: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor | None,
                 calls: dict, layers: range, micro: int):
        self.stack, self.inputs, self.targets, self.scale, self.micro = stack, inputs, targets, scale, micro
        self.calls, self.layers = calls, layers

    def _losses(self, chunk: list[int], blocks) -> torch.Tensor:
        calls = {index: self.calls[(index, len(chunk))] for index in self.layers}
        out = self.stack(self.inputs[chunk], blocks, calls)
        return cosine_loss(out, self.targets[chunk], self.scale)

    @torch.no_grad()
    def evaluate(self, blocks, windows: list[int]) -> float:
        """The mean loss over `windows` (all ranks together)."""
        total = torch.zeros((), dtype=torch.float64, device=self.inputs.device)
        for chunk in rank_chunks(windows, self.micro):
            total += self._losses(chunk, blocks).double().sum()
        all_reduce_sum_([total])
        return float(total) / len(windows)

    def train_step(self, perms: JointPermutations, slots, tau: float, batch: list[int], optimizer) -> float:
        """One optimiser step on `batch` (all ranks together); returns the batch's mean loss."""
        with torch.enable_grad():
            blocks = perms.forward_blocks(slots, tau)
            leaves = [b.detach().requires_grad_(True) for b in blocks]  # micro-batches accumulate here
            total = torch.zeros((), dtype=torch.float64, device=self.inputs.device)
            for chunk in rank_chunks(batch, self.micro):
                loss = self._losses(chunk, leaves).sum() / len(batch)
                loss.backward()
                total += loss.detach().double()
            optimizer.zero_grad(set_to_none=False)
            grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
            torch.autograd.backward(blocks, grads)
        parameters = [p for p in perms.parameters() if p.requires_grad]
        for p in parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        all_reduce_sum_([p.grad for p in parameters] + [total])
        optimizer.step()
        return float(total)


def _announce(first, count, groups, train, heldout, start, progress) -> None:
    """Say what is learned, on what, and the loss of the heuristic start (printed before the first step)."""
    text = (f"permllm: learning the permutations of {len(groups)} groups in decoder layers {first}-{count - 1} "
            f"jointly on {len(train)} calibration windows; heuristic start: held-out loss {start:.6f} "
            f"({len(heldout)} windows)")
    logger.info(text)
    if progress and rank_and_world()[0] == 0:
        tqdm.write(text)
