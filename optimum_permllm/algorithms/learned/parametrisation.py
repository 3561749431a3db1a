"""The learnable permutation: C/B independent B x B block permutations on top of a fixed start (PermLLM).

Conventions: `perm` follows the package (`W[:, perm]`); within block b, the block matrix `P[b, i, j] = 1`
moves source column i (in init_perm order) to slot j, so `W_b @ P[b]` permutes. `to_blocks` puts a matrix
in the block-major layout in which all block permutations are one batched matmul.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...sparse.permutation import check_permutation, identity_permutation
from ..assignment import assignment_matrix, batched_assignment
from ..sinkhorn import log_sinkhorn


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


def block_size_for(width: int, requested: int, m: int) -> int:
    """The largest block size <= requested that divides `width` and is a multiple of M (at least M)."""
    size = min(requested, width)
    while size >= m:
        if width % size == 0 and size % m == 0:
            return size
        size -= 1
    return math.gcd(width, m)
