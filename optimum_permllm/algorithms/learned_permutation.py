"""Learned channel permutations for one group of linear layers that share an input (PermLLM and OT).

A permutation is learned on top of an initial hard one (`init_perm`, e.g. RIA-CP) as C/B independent
B x B block permutations. PermLLM (method="sinkhorn") uses a straight-through estimator: the forward
pass uses the hard (Hungarian) permutation, the backward pass the gradient of the soft Sinkhorn one;
the mask's gradient comes from a group-membership surrogate (see _MembershipMask) instead of PermLLM's
softmax of permuted scores, whose first-order prediction of swap effects points the wrong way.
The optimal-transport variant (method="ot") trains through the soft entropic assignment itself and
hardens only to evaluate. Everything runs on weight columns, never on tokens: the `layer` objective
is the exact (mean relative) output error of the pruned layers, computed from the input Gram matrix.

Conventions: `perm` follows the package (`W[:, perm]`); within block b, the block matrix
`P[b, i, j] = 1` moves source column i (in init_perm order) to slot j, so `W_b @ P[b]` permutes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from ..sparse.nm import NMPattern, nm_mask
from ..sparse.permutation import check_permutation, identity_permutation, invert_permutation
from .assignment import assignment_matrix, batched_assignment
from .scores import score_fn
from .sinkhorn import log_sinkhorn
from .swap_refinement import refine_swaps

LossFn = Callable[[list[torch.Tensor]], torch.Tensor]

_METHODS = ("sinkhorn", "ot")
_OPTIMIZERS = ("normalized", "adamw")
# AdamW learning rates of the PermLLM paper: 1e-3 with Wanda scores, 5e-3 with RIA. The normalized step
# moves each block's most-pushed logit by lr * scale per step.
_DEFAULT_ADAMW_LR = {"magnitude": 1e-3, "wanda": 1e-3, "ria": 5e-3}
_DEFAULT_NORMALIZED_LR = 0.02
_DEFAULT_TAU = {"sinkhorn": (1.0, 0.1), "ot": (1.0, 0.05)}
# PermLLM normalises 5 times; the OT variant solves an entropic transport problem, so it iterates more.
_DEFAULT_SINKHORN_ITERS = {"sinkhorn": 5, "ot": 20}
# Sigmoid width of the membership surrogate in units of "members above": the gradient lives on the
# entries one rank either side of the keep/prune boundary.
_MEMBERSHIP_TEMPERATURE = 0.5
# Rounds of the exact swap search that polishes the Sinkhorn result (each round applies many swaps).
_DEFAULT_REFINE_ROUNDS = 5
# Rows drawn per step for the membership gradient (its cost is rows * C * B / M); all rows if fewer.
_MEMBERSHIP_ROWS = 512


class _StraightThrough(torch.autograd.Function):
    """Forward returns `hard` exactly (bit for bit); backward sends the gradient to `soft`."""

    @staticmethod
    def forward(ctx, hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        return hard.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, grad


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """`hard` in the forward pass, the gradient of `soft` in the backward pass."""
    return _StraightThrough.apply(hard.to(soft.dtype), soft)


class BlockPermutation(nn.Module):
    """Learnable block-diagonal permutation of `channels` inputs, applied on top of `init_perm`.

    Logits [C/B, B, B] start uniform in [-1/sqrt(B), 1/sqrt(B)] times a learnable scale sqrt(B)
    (the PermLLM paper's initialisation). The columns of each random block are then reordered so that its optimal
    assignment is the identity: the distribution is unchanged, but training starts exactly at
    `init_perm`. The hard permutation is the Hungarian (maximum-weight) assignment of the logits,
    i.e. the limit of the Sinkhorn permutation as the temperature goes to zero, so annealing the
    temperature alone never moves it.
    """

    def __init__(
        self,
        channels: int,
        block_size: int = 64,
        init_perm: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        learn_scale: bool = True,
        init_bias: float = 0.0,
    ):
        super().__init__()
        if block_size < 1 or channels % block_size != 0:
            raise ValueError(
                f"block_size={block_size} must divide the {channels} input channels; pick a divisor of "
                f"{channels} (for example {math.gcd(channels, 64)})."
            )
        if init_perm is None:
            init_perm = identity_permutation(channels)
        check_permutation(init_perm, channels)
        self.block_size = block_size
        self.num_blocks = channels // block_size
        bound = 1.0 / math.sqrt(block_size)
        weight = torch.rand(self.num_blocks, block_size, block_size, generator=generator) * (2 * bound) - bound
        weight = _align_to_identity(weight) + (init_bias / math.sqrt(block_size)) * torch.eye(block_size)
        self.weight = nn.Parameter(weight)
        self.scale = nn.Parameter(torch.tensor(math.sqrt(block_size)), requires_grad=learn_scale)
        self.register_buffer("init_perm", init_perm.detach().long().cpu().clone())

    @property
    def channels(self) -> int:
        """Number of permuted input channels."""
        return self.num_blocks * self.block_size

    def logits(self) -> torch.Tensor:
        """Block logits [C/B, B, B]: entry (b, i, j) favours moving source i of block b to slot j."""
        return self.scale * self.weight

    def soft(self, tau: float, n_iters: int = 5) -> torch.Tensor:
        """Soft (doubly stochastic) block permutations [C/B, B, B] at temperature `tau`."""
        return log_sinkhorn(self.logits() / tau, n_iters).exp()

    def hard_blocks(self) -> torch.Tensor:
        """Slot of every source channel [C/B, B]: the Hungarian assignment of each block's logits."""
        return batched_assignment(self.logits().detach(), maximize=True)

    def perm_from_blocks(self, slots: torch.Tensor) -> torch.Tensor:
        """The full permutation [C] (package convention) for block assignments `slots` [C/B, B]."""
        sources = torch.argsort(slots, dim=-1)  # slot j of block b reads source sources[b, j]
        offsets = torch.arange(self.num_blocks, device=slots.device).unsqueeze(-1) * self.block_size
        return self.init_perm.to(slots.device)[(sources + offsets).reshape(-1)]

    def hard(self) -> torch.Tensor:
        """The current hardened permutation [C] (long), including `init_perm`."""
        return self.perm_from_blocks(self.hard_blocks())

    def straight_through(self, slots: torch.Tensor, tau: float, n_iters: int = 5) -> torch.Tensor:
        """Blocks [C/B, B, B] equal to the hard assignment `slots`, with the soft Sinkhorn gradient."""
        soft = self.soft(tau, n_iters)
        return straight_through(assignment_matrix(slots, dtype=soft.dtype), soft)

    def forward(self, tau: float, n_iters: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """(hard perm [C], straight-through blocks [C/B, B, B]: hard forward, soft Sinkhorn backward)."""
        slots = self.hard_blocks()
        return self.perm_from_blocks(slots), self.straight_through(slots, tau, n_iters)


def _align_to_identity(weight: torch.Tensor) -> torch.Tensor:
    """Reorder the columns of every block so that its maximum-weight assignment is the identity."""
    slots = batched_assignment(weight, maximize=True)
    return torch.gather(weight, -1, slots.unsqueeze(-2).expand_as(weight))


def to_blocks(matrix: torch.Tensor, block_size: int) -> torch.Tensor:
    """[out, C] -> block-major [C/B, out, B], the layout in which block permutations are one bmm."""
    out, channels = matrix.shape
    return matrix.reshape(out, channels // block_size, block_size).transpose(0, 1).contiguous()


def from_blocks(blocked: torch.Tensor) -> torch.Tensor:
    """Block-major [C/B, out, B] -> [out, C] (inverse of `to_blocks`)."""
    num_blocks, out, size = blocked.shape
    return blocked.transpose(0, 1).reshape(out, num_blocks * size)


def soft_nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Hard top-n of every m-group in the forward pass; gradient of n * per-group softmax backward.

    Callers pass scores normalised by their row mean (raw metrics have arbitrary scale). The
    softmax is written out because torch's kernel is slow on a last dimension of size m.
    """
    grouped = scores.unflatten(-1, (-1, m))
    exp = (grouped - grouped.amax(dim=-1, keepdim=True).detach()).exp()
    soft = (n * exp / exp.sum(dim=-1, keepdim=True)).flatten(-2)
    return straight_through(nm_mask(scores.detach(), n, m), soft)


class _MembershipMask(torch.autograd.Function):
    """Hard N:M mask of the sources under a block assignment, with a group-membership gradient.

    Forward: the exact mask, in source (init_perm) order, of every source column once the blocks
    place it in its slot. Backward: the gradient of the surrogate
    mask[r, c] = sum_q Z[c, q] * sigmoid((n - 1/2 - count[r, c, q]) / t), where Z[c, q] = 1 when
    source c sits in group q and count[r, c, q] is the number of members of q scoring above c in
    row r. A swap changes the counts linearly, so at a hard permutation this gradient predicts swap
    effects, which the gradient of PermLLM's permuted soft mask does not: its first-order term moves
    masks between columns.
    """

    @staticmethod
    def forward(ctx, blocks, slots, scores, order, n, m, temperature, rows=None):
        index = slots.unsqueeze(1).expand_as(scores)
        permuted = torch.empty_like(scores).scatter_(-1, index, scores)  # slot slots[c] holds source c
        mask = torch.gather(nm_mask(permuted, n, m), -1, index)
        ctx.save_for_backward(slots, order, rows)
        ctx.settings = (n, m, temperature)
        return mask.to(blocks.dtype)

    @staticmethod
    def backward(ctx, grad):
        slots, order, rows = ctx.saved_tensors
        n, m, temperature = ctx.settings
        if rows is not None:  # an unbiased estimate of the sum over rows from a subset
            grad, order = grad[:, rows] * (grad.shape[1] / rows.numel()), order[:, rows]
        groups = slots // m
        chunk = max(1, _CHUNK_ELEMENTS // max(1, order.shape[1] * slots.shape[1] ** 2 // m))
        membership = torch.cat(
            [
                _membership_grad(grad[i : i + chunk], groups[i : i + chunk], order[i : i + chunk], n, m, temperature)
                for i in range(0, slots.shape[0], chunk)
            ]
        )
        return membership.repeat_interleave(m, dim=-1), None, None, None, None, None, None, None


# Bound on the [blocks, out, B, B/m] temporaries of the membership gradient (elements per chunk).
_CHUNK_ELEMENTS = 1 << 24


def _membership_grad(grad, groups, order, n, m, temperature) -> torch.Tensor:
    """d loss / d Z [k, B, B/m] for blocks of mask gradients `grad` [k, out, B] (see _MembershipMask)."""
    k, out, size = grad.shape
    num_groups = size // m
    # Work in each row's ascending score order, groups on dim -2, so that "members of q scoring
    # above / below" are cumsums along the contiguous last dim.
    sorted_groups = torch.gather(groups.unsqueeze(1).expand(k, out, size), -1, order).unsqueeze(-2)
    member = sorted_groups == torch.arange(num_groups, device=grad.device).view(num_groups, 1)  # [k, out, Q, B]
    # Every group has m members, so "members of q scoring above" is m - (members up to here).
    keep = member.cumsum(dim=-1, dtype=grad.dtype).mul_(1 / temperature).add_((n - 0.5 - m) / temperature).sigmoid_()
    sorted_grad = torch.gather(grad, -1, order).unsqueeze(-2)
    own_keep = torch.gather(keep, -2, sorted_groups)
    weighted = member * (sorted_grad * own_keep * (1 - own_keep))
    below = weighted.cumsum(dim=-1).sub_(weighted)  # sum over the members of q that score lower
    term = keep.mul_(sorted_grad).sub_(below, alpha=1 / temperature)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(size, device=order.device).expand_as(order))
    unsorted = torch.gather(term, -1, rank.unsqueeze(-2).expand_as(term))  # back to source order
    return unsorted.sum(dim=1).transpose(-1, -2)  # [k, B, Q]


class _GramQuadratic(torch.autograd.Function):
    """sum_rows d G d^T for d [out, C] and a symmetric G; reuses d @ G for the gradient 2 d G."""

    @staticmethod
    def forward(ctx, delta: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        product = delta @ gram
        ctx.save_for_backward(product)
        return (delta * product).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (product,) = ctx.saved_tensors
        return 2 * grad * product, None


def output_energies(weights: Sequence[torch.Tensor], gram: torch.Tensor) -> list[float]:
    """tr(W_l G W_l^T) per layer: each layer's squared output norm on the calibration inputs."""
    gram = 0.5 * (gram.detach().float() + gram.detach().float().T)
    energies = [float(_GramQuadratic.apply(w.detach().float(), gram)) for w in weights]
    if not all(e > 0 for e in energies):
        raise ValueError("A layer of the group has zero output on the calibration inputs; nothing to reconstruct.")
    return energies


def balanced_weights(weights: Sequence[torch.Tensor], gram: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's weight divided by sqrt(L * its output energy), so that every layer of the group
    carries the same share of a summed output error (masks are per row, so they do not change)."""
    energies = output_energies(weights, gram)
    return [w.detach().float() / math.sqrt(len(energies) * e) for w, e in zip(weights, energies)]


class LayerObjective:
    """Mean relative output error of the pruned layers, exact from the input Gram matrix G = X^T X / n.

    loss(W'_1..W'_L) = mean_l tr((W_l - W'_l) G (W_l - W'_l)^T) / tr(W_l G W_l^T), i.e. the mean over
    layers of ||X W_l^T - X W'_l^T||^2 / ||X W_l^T||^2 on the calibration tokens, without the tokens.
    The mean of per-layer ratios, not one ratio of sums: scaling q_proj by c and k_proj by 1/c (or
    up_proj and down_proj) leaves the model unchanged, so the objective must not depend on it, and a ratio
    of sums lets a member with large outputs (q_proj) drown a small one's error (v_proj; research/FINDINGS.md).
    """

    def __init__(self, weights: Sequence[torch.Tensor], gram: torch.Tensor):
        channels = weights[0].shape[1]
        if gram.shape != (channels, channels):
            raise ValueError(f"gram has shape {tuple(gram.shape)}, expected [{channels}, {channels}] (the input width).")
        energies = output_energies(weights, gram)
        self.dense = torch.cat([w.detach().float() for w in weights])
        self.gram = 0.5 * (gram.detach().float() + gram.detach().float().T)
        scales = [torch.full((w.shape[0], 1), (len(weights) * e) ** -0.5) for w, e in zip(weights, energies)]
        self.row_scale = torch.cat(scales).to(self.dense.device)

    def __call__(self, masked_weights: Sequence[torch.Tensor]) -> torch.Tensor:
        """The mean relative error of `masked_weights` (the pruned layers, original column order)."""
        delta = (self.dense - torch.cat(list(masked_weights))) * self.row_scale
        return _GramQuadratic.apply(delta, self.gram)


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
    membership_rows: int = _MEMBERSHIP_ROWS

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
        if not blocks.requires_grad or out <= self.membership_rows:
            return None
        rows = torch.randperm(out, generator=self.generator)[: self.membership_rows]
        return rows.sort().values.to(self.scores.device)

    def hard_loss(self, slots: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """The exact objective of the hard assignment `slots`; gradients reach `blocks` (membership)."""
        mask = _MembershipMask.apply(
            blocks, slots, self.scores, self.order, self.n, self.m, _MEMBERSHIP_TEMPERATURE, self._rows(blocks)
        )
        restored = from_blocks(self.weights * mask)[:, self.inverse_init]
        return self.loss_fn(list(torch.split(restored, self.splits)))


def learn_permutation(
    weights: Sequence[torch.Tensor],
    gram: torch.Tensor | None,
    feature_norms: torch.Tensor | None,
    n: int,
    m: int,
    metric: str = "wanda",
    method: str = "sinkhorn",
    init_perm: torch.Tensor | None = None,
    block_size: int = 64,
    steps: int = 20,
    lr: float | None = None,
    tau: tuple[float, float] | None = None,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    callback: Callable[[int, float, float], bool | None] | None = None,
    progress: bool = False,
    weight_decay: float = 0.1,
    sinkhorn_iters: int | None = None,
    init_bias: float = 1.0,
    optimizer: str = "normalized",
    refine_rounds: int = _DEFAULT_REFINE_ROUNDS,
) -> LearnResult:
    """Learn one input permutation for the layers `weights` ([out_l, C] each) that share an input.

    The loss is `loss_fn(pruned weights in original column order)`, by default the exact `layer`
    objective from `gram` [C, C]. Mask scores come from `metric` on the dense weights
    (`feature_norms` default to sqrt(diag(gram)), which ranks the same). `tau` is the Sinkhorn
    temperature (or the OT entropy eps) annealed linearly; lr follows a cosine schedule. The hard
    permutation is evaluated at every step and the best one is kept, `init_perm` included, so the
    result never loses to its initialisation. `callback(step, loss, best_loss)` may return True to stop.
    `optimizer`: "normalized" (default: each block's gradient divided by its largest entry, so the
    most strongly predicted swaps happen first) or "adamw" (the paper's; its per-entry normalisation
    flips many weakly pushed entries at once, which moves a good initialisation away from its optimum).
    `init_bias` (logit units) is added to the diagonal so the first changes need a consistent push.
    `refine_rounds` rounds of exact greedy swaps (algorithms.swap_refinement) then polish the best
    permutation on the `layer` objective (needs `gram`). With a custom `loss_fn` (such as the `model` scope)
    there is no polish: the swap search can only search the Gram objective, and letting the
    scope accept or reject its result would be a Gram search, not the scope's; the Sinkhorn or OT
    steps are the scope's whole search, so everything it keeps was chosen on its own objective.
    """
    if method not in _METHODS:
        raise ValueError(f"Unknown method {method!r}; valid methods: {', '.join(_METHODS)}.")
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {optimizer!r}; valid optimizers: {', '.join(_OPTIMIZERS)}.")
    if steps < 0 or refine_rounds < 0:
        raise ValueError(f"steps and refine_rounds must be >= 0, got {steps} and {refine_rounds}.")
    problem = _prepare(weights, gram, feature_norms, n, m, metric, init_perm, block_size, loss_fn)
    generator = torch.Generator().manual_seed(seed)
    problem.generator = torch.Generator().manual_seed(seed + 1)
    module = BlockPermutation(
        problem.init_perm.numel(), block_size, problem.init_perm.cpu(), generator, optimizer == "adamw", init_bias
    ).to(problem.weights.device)
    if lr is None:
        lr = _DEFAULT_NORMALIZED_LR if optimizer == "normalized" else _DEFAULT_ADAMW_LR.get(metric.lower(), 1e-3)
    tau_start, tau_end = _DEFAULT_TAU[method] if tau is None else tau
    iters = _DEFAULT_SINKHORN_ITERS[method] if sinkhorn_iters is None else sinkhorn_iters
    optimizer = _optimizer(module, optimizer, lr, weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / max(steps, 1))))
    step_fn = _sinkhorn_step if method == "sinkhorn" else _ot_step
    tracker = _BestTracker()
    for step in _steps(steps, progress):
        t = tau_start + (tau_end - tau_start) * step / max(steps - 1, 1)
        perm, hard_loss = step_fn(module, problem, optimizer, t, iters)
        tracker.update(perm, hard_loss)
        schedule.step()
        if callback is not None and callback(step, hard_loss, tracker.best_loss):
            break
    with torch.no_grad():
        final = module.hard_blocks()
        tracker.update(module.perm_from_blocks(final), _hard_loss(module, problem, final))
    if refine_rounds > 0 and gram is not None and loss_fn is None:
        _polish(problem, tracker, weights, gram, block_size, refine_rounds, callback, steps)
    return LearnResult(tracker.best_perm.cpu(), tracker.best_loss, tracker.history[0], tracker.history)


def _polish(problem, tracker, weights, gram, block_size, rounds, callback, step) -> None:
    """Refine the best permutation by exact swaps on the Gram (`layer`) objective and offer it to the tracker."""
    scores = from_blocks(problem.scores)[:, problem.inverse_init]  # original column order
    refined = refine_swaps(balanced_weights(weights, gram), gram, scores, tracker.best_perm, problem.n, problem.m, block_size, rounds)
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
    scores = torch.cat([scorer(w, feature_norms) for w in weights])
    scores = scores / scores.mean(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
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


class NormalizedDescent(torch.optim.Optimizer):
    """Gradient descent on [blocks, B, B] logits with each block's gradient scaled to max |g| = 1.

    Keeps the ranking of the gradient entries (unlike Adam's per-entry normalisation), so the hard
    assignment first changes where the loss predicts the largest gain; scale-free like Adam.
    """

    def __init__(self, params, lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        """One normalised descent step."""
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    peak = param.grad.abs().amax(dim=(-1, -2), keepdim=True).clamp_min(torch.finfo(param.dtype).tiny)
                    param.sub_(group["lr"] * param.grad / peak)


def _optimizer(module: BlockPermutation, kind: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimiser of the logits. AdamW decays the block logits only: the scale is a temperature."""
    if kind == "normalized":
        return NormalizedDescent([module.weight], lr)
    groups = [{"params": [module.weight], "weight_decay": weight_decay}]
    if module.scale.requires_grad:
        groups.append({"params": [module.scale], "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=lr)


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
        hard_loss = _hard_loss(module, problem, slots)
    loss = problem.loss(module.soft(eps, iters))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return module.perm_from_blocks(slots), hard_loss


def _hard_loss(module: BlockPermutation, problem: _Problem, slots: torch.Tensor) -> float:
    """The objective of the hard block assignment `slots`."""
    with torch.no_grad():
        return float(problem.hard_loss(slots, assignment_matrix(slots, dtype=problem.weights.dtype)))


class _BestTracker:
    """Keeps the lowest-loss hard permutation seen; the first one seen is the initialisation."""

    def __init__(self):
        self.best_perm: torch.Tensor | None = None
        self.best_loss = math.inf
        self.history: list[float] = []

    def update(self, perm: torch.Tensor, loss: float) -> None:
        """Record one evaluated permutation."""
        self.history.append(loss)
        if loss < self.best_loss:
            self.best_perm, self.best_loss = perm.clone(), loss


def _steps(steps: int, progress: bool):
    """range(steps), with a tqdm bar when asked."""
    if not progress:
        return range(steps)
    from tqdm.auto import trange

    return trange(steps, desc="learn permutation", leave=False)
