"""The N:M mask of permuted scores with a gradient for the permutation (two surrogates).

- `soft_nm_mask` (PermLLM's, used by the `model` scope): the hard top-N of every M-group forward, the
  gradient of N times a per-group softmax backward; `masked_weight` applies it to a linear through its
  block permutation, as the paper does (the weight is never permuted: only its mask is).
- `membership_mask` (the `layer` scope's): the exact mask forward, the gradient of a group-membership
  surrogate backward, which predicts the effect of a channel swap where the softmax's does not.
"""

from __future__ import annotations

import torch

from ...sparse.nm import nm_mask
from .parametrisation import from_blocks, straight_through, to_blocks

# Sigmoid width of the membership surrogate in units of "members above": the gradient lives on the
# entries one rank either side of the keep/prune boundary.
MEMBERSHIP_TEMPERATURE = 0.5


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
        chunk = max(1, CHUNK_ELEMENTS // max(1, order.shape[1] * slots.shape[1] ** 2 // m))
        membership = torch.cat(
            [
                _membership_grad(grad[i : i + chunk], groups[i : i + chunk], order[i : i + chunk], n, m, temperature)
                for i in range(0, slots.shape[0], chunk)
            ]
        )
        return membership.repeat_interleave(m, dim=-1), None, None, None, None, None, None, None


# Bound on the [blocks, out, B, B/m] temporaries of the membership gradient (elements per chunk).
CHUNK_ELEMENTS = 1 << 24


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




def membership_mask(blocks, slots, scores, order, n: int, m: int, rows=None) -> torch.Tensor:
    """The hard N:M mask (source order) of `scores` [C/B, out, B] under `slots`, with the membership gradient
    reaching `blocks` (see _MembershipMask); `order` is argsort(scores, -1), `rows` an optional row subset."""
    return _MembershipMask.apply(blocks, slots, scores, order, n, m, MEMBERSHIP_TEMPERATURE, rows)


def row_normalised(scores: torch.Tensor) -> torch.Tensor:
    """Scores divided by their row mean: raw metrics have an arbitrary scale, which a softmax would see."""
    return scores / scores.mean(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def masked_weight(weight: torch.Tensor, scores: torch.Tensor, blocks: torch.Tensor, init_perm: torch.Tensor,
                  inverse_init: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """`weight` [out, C] times the N:M mask of `scores` read through `init_perm` then the block permutations
    `blocks` [C/B, B, B], mapped back to the original column order (PermLLM's W * (mask(S P) P^T)).

    With hard (straight-through) blocks the forward value is exactly the pruned weight; gradients reach the
    blocks through the softmax of the permuted scores and through the mapping back."""
    permuted = torch.bmm(to_blocks(scores[:, init_perm], blocks.shape[-1]), blocks)
    mask = torch.bmm(soft_nm_mask(permuted, n, m), blocks.transpose(-1, -2))
    return weight * from_blocks(mask)[:, inverse_init].to(weight.dtype)
