"""The sparse forward of the `model` scope (PermLLM as published): decoder layers whose every pruned linear
reads its weight through its group's learnable permutation.

A linear's weight in the forward is W * mask, the mask being the N:M mask of the group's permutation score
(the plan's: Wanda, RIA, magnitude, or lsq's OBS-weighted form) read in the group's current permutation and
mapped back (algorithms.learned.masks.masked_weight). With straight-through blocks the forward value is the
pruned model of the current hard permutations exactly; gradients reach the block logits. The model is never
modified: weights are substituted with torch.func.functional_call, the model's own parameters detached.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..algorithms.assignment import assignment_matrix, batched_assignment
from ..algorithms.learned import BlockPermutation, LearningSettings, masked_weight
from ..algorithms.learned.masks import row_normalised
from ..algorithms.scores import score_fn
from ..sparse.nm import NMPattern
from ..sparse.permutation import invert_permutation
from .capture import LayerCall


@dataclass
class LearnedGroup:
    """One group of linears sharing an input in a learned decoder layer: the layer's index, the linears' names
    inside it, the per-input factor of their scores (None for magnitude) and the permutation learning starts
    from (the heuristic one)."""

    layer: int
    names: tuple[str, ...]
    norms: torch.Tensor | None
    init_perm: torch.Tensor
    block_size: int

    def __post_init__(self):
        self.inverse_init = invert_permutation(self.init_perm)


class JointPermutations(nn.Module):
    """The learnable block permutations of every learned group, and their hard and straight-through forms."""

    def __init__(self, groups: Sequence[LearnedGroup], settings: LearningSettings, generator: torch.Generator):
        super().__init__()
        self.groups = list(groups)
        self.settings = settings  # resolved
        self.blocks = nn.ModuleList(
            BlockPermutation(g.init_perm.numel(), g.block_size, g.init_perm.cpu(), generator,
                             learn_scale=settings.optimizer == "adamw", init_bias=settings.init_bias)
            for g in self.groups)

    def hard_slots(self) -> list[torch.Tensor]:
        """Every group's Hungarian assignment [C/B, B]; blocks of one size are solved in one batched call."""
        slots: list[torch.Tensor | None] = [None] * len(self.blocks)
        for size in sorted({module.block_size for module in self.blocks}):
            members = [i for i, module in enumerate(self.blocks) if module.block_size == size]
            logits = torch.cat([self.blocks[i].logits().detach() for i in members])
            solved = batched_assignment(logits, maximize=True).split([self.blocks[i].num_blocks for i in members])
            for i, part in zip(members, solved):
                slots[i] = part
        return slots

    def perms(self, slots: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The full permutation [C] (package convention, init_perm included) of every group."""
        return [module.perm_from_blocks(s) for module, s in zip(self.blocks, slots)]

    def forward_blocks(self, slots: Sequence[torch.Tensor], tau: float | None) -> list[torch.Tensor]:
        """The blocks [C/B, B, B] the forward pass multiplies by: exactly `slots` when `tau` is None (no gradient);
        otherwise the Sinkhorn learner's straight-through blocks, or the OT learner's soft ones."""
        if tau is None:
            return [assignment_matrix(s) for s in slots]
        iters = self.settings.sinkhorn_iters
        if self.settings.learner == "ot":
            return [module.soft(tau, iters) for module in self.blocks]
        return [module.straight_through(s, tau, iters) for module, s in zip(self.blocks, slots)]


class SparseStack:
    """Runs decoder layers `first..` with the learned groups' masked weights, each layer checkpointed."""

    def __init__(self, layers: Sequence[nn.Module], first: int, groups: Sequence[LearnedGroup], pattern: NMPattern,
                 metric: str, checkpointing: bool = True):
        self.layers, self.first = list(layers), first
        self.per_layer = [[i for i, g in enumerate(groups) if g.layer == first + j] for j in range(len(self.layers))]
        self.groups, self.pattern, self.metric = list(groups), pattern, metric
        self.checkpointing = checkpointing

    def __call__(self, hidden: torch.Tensor, blocks: Sequence[torch.Tensor], calls: dict[int, LayerCall]) -> torch.Tensor:
        """The last hidden states from `hidden` (the first layer's input); `calls[index]` runs layer `index`."""
        for j, layer in enumerate(self.layers):
            members = self.per_layer[j]
            run = partial(self._layer, layer, calls[self.first + j], [self.groups[i] for i in members])
            inputs = [blocks[i] for i in members]
            if self.checkpointing and torch.is_grad_enabled():
                hidden = checkpoint(run, hidden, *inputs, use_reentrant=False)
            else:
                hidden = run(hidden, *inputs)
        return hidden

    def _layer(self, layer, call, groups, hidden, *blocks) -> torch.Tensor:
        """One decoder layer with its groups' masked weights (masks in float32, the layer in bf16 on a GPU)."""
        params = {name: p.detach() for name, p in layer.named_parameters()}
        for group, group_blocks in zip(groups, blocks):
            for name in group.names:
                weight = params[f"{name}.weight"]
                scores = row_normalised(score_fn(self.metric)(weight, group.norms))
                params[f"{name}.weight"] = masked_weight(weight, scores, group_blocks, group.init_perm,
                                                         group.inverse_init, self.pattern.n, self.pattern.m)
        with torch.autocast("cuda", dtype=torch.bfloat16) if hidden.is_cuda else nullcontext():
            return call.run(layer, hidden, params)

