"""The `layer` scope's learner: one input permutation for one group of linears that share an input.

The permutation is learned on top of an initial hard one (`init_perm`, e.g. RIA-CP) as block permutations
(parametrisation.py). The Sinkhorn learner (PermLLM) uses a straight-through estimator: the forward pass
uses the hard (Hungarian) permutation, the backward pass the gradient of the soft Sinkhorn one, and the
mask's gradient comes from the group-membership surrogate (masks.py). The optimal-transport learner
trains through the soft entropic assignment itself and hardens only to evaluate. Everything runs on
weight columns, never on tokens: the objective is the exact output error from the input Gram matrix
(objectives.LayerObjective), and exact greedy swaps polish the best permutation found.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch

from ...sparse.nm import NMPattern
from ...sparse.permutation import check_permutation, identity_permutation, invert_permutation
from ..assignment import assignment_matrix
from ..scores import score_fn
from ..swap_refinement import refine_swaps
from .masks import membership_mask, row_normalised, soft_nm_mask
from .objectives import LayerObjective, balanced_weights
from .optimisation import BestTracker, make_optimizer, temperature
from .parametrisation import BlockPermutation, from_blocks, to_blocks
from .settings import LearningSettings

LossFn = Callable[[list[torch.Tensor]], torch.Tensor]

# Rows drawn per step for the membership gradient (its cost is rows * C * B / M); all rows if fewer.
MEMBERSHIP_ROWS = 512


@dataclass
class LearnResult:
    """Outcome of `learn_permutation`: the best hard permutation seen and the loss history."""

    perm: torch.Tensor
    best_loss: float
    init_loss: float
    history: list[float] = field(default_factory=list)



@dataclass
class _Problem:
    """One group of layers prepared for learning: weights and scores in init_perm order."""

    weights: torch.Tensor  # block-major [C/B, sum out, B], columns in init_perm order
    scores: torch.Tensor  # block-major [C/B, sum out, B], row-normalised, columns in init_perm order
    init_perm: torch.Tensor  # [C]
    inverse_init: torch.Tensor  # [C], undoes init_perm
    order: torch.Tensor  # block-major [C/B, sum out, B]: ascending score order inside each block row
    splits: list[int]
    loss_fn: LossFn
    n: int
    m: int
    generator: torch.Generator | None = None

    def masked(self, blocks: torch.Tensor) -> list[torch.Tensor]:
        """Pruned weights (original column order) when the blocks permute the columns."""
        permuted = torch.bmm(self.weights, blocks)
        mask = soft_nm_mask(torch.bmm(self.scores, blocks), self.n, self.m)
        restored = from_blocks(torch.bmm(permuted * mask, blocks.transpose(-1, -2)))[:, self.inverse_init]
        return list(torch.split(restored, self.splits))

    def loss(self, blocks: torch.Tensor) -> torch.Tensor:
        """The objective for soft or hard blocks (weights and scores permuted by matmul)."""
        return self.loss_fn(self.masked(blocks))

    def perm_loss(self, perm: torch.Tensor) -> float:
        """The exact objective of a full permutation that is block-wise on top of init_perm."""
        blocks, size = self.weights.shape[0], self.weights.shape[-1]
        sources = self.inverse_init[perm].view(blocks, size)
        sources = sources - torch.arange(blocks, device=sources.device).unsqueeze(-1) * size
        if bool(((sources < 0) | (sources >= size)).any()):
            raise ValueError("perm moves channels between blocks of init_perm; it is not a block-wise permutation.")
        slots = torch.argsort(sources, dim=-1)  # source c sits in slot slots[c]
        return float(self.hard_loss(slots, assignment_matrix(slots, dtype=self.weights.dtype)))

    def _rows(self, blocks: torch.Tensor) -> torch.Tensor | None:
        """A random subset of rows for the membership gradient, or None for all of them."""
        out = self.scores.shape[1]
        if not blocks.requires_grad or out <= MEMBERSHIP_ROWS:
            return None
        rows = torch.randperm(out, generator=self.generator)[:MEMBERSHIP_ROWS]
        return rows.sort().values.to(self.scores.device)

    def hard_loss(self, slots: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """The exact objective of the hard assignment `slots`; gradients reach `blocks` (membership)."""
        mask = membership_mask(blocks, slots, self.scores, self.order, self.n, self.m, self._rows(blocks))
        restored = from_blocks(self.weights * mask)[:, self.inverse_init]
        return self.loss_fn(list(torch.split(restored, self.splits)))


def learn_permutation(weights: Sequence[torch.Tensor], gram: torch.Tensor | None, feature_norms: torch.Tensor | None,
                      n: int, m: int, settings: LearningSettings = LearningSettings(), *, metric: str = "wanda",
                      init_perm: torch.Tensor | None = None, loss_fn: LossFn | None = None,
                      callback: Callable[[int, float, float], bool | None] | None = None,
                      progress: bool = False) -> LearnResult:
    """Learn one input permutation for the layers `weights` ([out_l, C] each) that share an input.

    The loss is `loss_fn(pruned weights in original column order)`, by default the exact `layer`
    objective from `gram` [C, C]. Mask scores come from `metric` on the dense weights
    (`feature_norms` default to sqrt(diag(gram)), which ranks the same). `settings` gives the learner, the
    budget and the block size (which must divide C; the `layer` scope's defaults whatever its scope says).
    The hard permutation is evaluated at every step and the best one is kept, `init_perm` included, so the
    result never loses to its initialisation. `callback(step, loss, best_loss)` may return True to stop.
    The optimiser "normalized" (default) divides each block's gradient by its largest entry, so the
    most strongly predicted swaps happen first; "adamw" (the paper's) normalises per entry and flips many
    weakly pushed entries at once, which moves a good initialisation away from its optimum.
    `refine_rounds` rounds of exact greedy swaps (algorithms.swap_refinement) then polish the best
    permutation on the `layer` objective (needs `gram`). With a custom `loss_fn` there is no polish: the
    swap search can only search the Gram objective, so the Sinkhorn or OT steps are the custom objective's
    whole search, and everything kept was chosen on it.
    """
    s = replace(settings, scope="layer").resolved(metric)
    problem = _prepare(weights, gram, feature_norms, n, m, metric, init_perm, s.block_size, loss_fn)
    problem.generator = torch.Generator().manual_seed(s.seed + 1)
    module = BlockPermutation(problem.init_perm.numel(), s.block_size, problem.init_perm.cpu(),
                              torch.Generator().manual_seed(s.seed), s.optimizer == "adamw",
                              s.init_bias).to(problem.weights.device)
    optimizer, schedule = make_optimizer([module], s.optimizer, s.lr, s.weight_decay, s.steps)
    step_fn = _sinkhorn_step if s.learner == "sinkhorn" else _ot_step
    tracker = BestTracker()
    for step in _steps(s.steps, progress):
        perm, hard_loss = step_fn(module, problem, optimizer, temperature(step, s.steps, s.tau), s.sinkhorn_iters)
        tracker.update(perm, hard_loss)
        schedule.step()
        if callback is not None and callback(step, hard_loss, tracker.best_loss):
            break
    with torch.no_grad():
        final = module.hard_blocks()
        tracker.update(module.perm_from_blocks(final), _hard_loss(problem, final))
    if s.refine_rounds > 0 and gram is not None and loss_fn is None:
        _polish(problem, tracker, weights, gram, s.block_size, s.refine_rounds, callback, s.steps)
    return LearnResult(tracker.best.cpu(), tracker.best_loss, tracker.history[0], tracker.history)


def _polish(problem, tracker, weights, gram, block_size, rounds, callback, step) -> None:
    """Refine the best permutation by exact swaps on the Gram (`layer`) objective and offer it to the tracker."""
    scores = from_blocks(problem.scores)[:, problem.inverse_init]  # original column order
    refined = refine_swaps(balanced_weights(weights, gram), gram, scores, tracker.best, problem.n, problem.m, block_size, rounds)
    with torch.no_grad():
        loss = problem.perm_loss(refined.perm.to(problem.init_perm.device))
    tracker.update(refined.perm.to(problem.init_perm.device), loss)
    if callback is not None:
        callback(step, loss, tracker.best_loss)


def _prepare(weights, gram, feature_norms, n, m, metric, init_perm, block_size, loss_fn) -> _Problem:
    """Validate the inputs and put weights and scores in init_perm order."""
    if not weights:
        raise ValueError("learn_permutation needs at least one weight.")
    channels = weights[0].shape[1]
    if any(w.dim() != 2 or w.shape[1] != channels for w in weights):
        raise ValueError(f"All weights must be 2-D with {channels} input columns: {[tuple(w.shape) for w in weights]}.")
    NMPattern(n, m).check_width(channels)
    if block_size % m != 0:
        raise ValueError(f"block_size={block_size} must be a multiple of M={m} so that N:M groups stay inside blocks.")
    if loss_fn is None:
        if gram is None:
            raise ValueError("Pass the input Gram matrix `gram` for the layer objective, or a custom `loss_fn`.")
        loss_fn = LayerObjective(weights, gram)
    if feature_norms is None:
        if gram is None:
            raise ValueError(f"The {metric} metric needs `feature_norms` (or `gram` to derive them).")
        feature_norms = torch.diagonal(gram).float().clamp_min(0).sqrt()
    scorer = score_fn(metric)
    scores = row_normalised(torch.cat([scorer(w, feature_norms) for w in weights]))
    device = weights[0].device
    if init_perm is None:
        init_perm = identity_permutation(channels)
    check_permutation(init_perm, channels)
    order = init_perm.detach().long().to(device)
    dense = torch.cat([w.detach().float() for w in weights])
    return _Problem(
        weights=to_blocks(dense[:, order], block_size),
        scores=(blocked := to_blocks(scores[:, order], block_size)),
        order=torch.argsort(blocked, dim=-1),
        init_perm=order,
        inverse_init=invert_permutation(order),
        splits=[w.shape[0] for w in weights],
        loss_fn=loss_fn,
        n=n,
        m=m,
    )


def _sinkhorn_step(module, problem, optimizer, tau, iters) -> tuple[torch.Tensor, float]:
    """One PermLLM step: the forward value is the exact loss of the current hard permutation."""
    slots = module.hard_blocks()
    loss = problem.hard_loss(slots, module.straight_through(slots, tau, iters))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return module.perm_from_blocks(slots), float(loss.detach())


def _ot_step(module, problem, optimizer, eps, iters) -> tuple[torch.Tensor, float]:
    """One OT step: train through the soft assignment, then score the hardened one."""
    with torch.no_grad():
        slots = module.hard_blocks()
        hard_loss = _hard_loss(problem, slots)
    loss = problem.loss(module.soft(eps, iters))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return module.perm_from_blocks(slots), hard_loss


def _hard_loss(problem: _Problem, slots: torch.Tensor) -> float:
    """The objective of the hard block assignment `slots`."""
    with torch.no_grad():
        return float(problem.hard_loss(slots, assignment_matrix(slots, dtype=problem.weights.dtype)))


def _steps(steps: int, progress: bool):
    """range(steps), with a tqdm bar when asked."""
    if not progress:
        return range(steps)
    from tqdm.auto import trange

    return trange(steps, desc="learn permutation", leave=False)
