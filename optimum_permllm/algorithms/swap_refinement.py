"""Exact greedy swap search for a channel permutation under the Gram-form `layer` objective.

Swapping two channels between N:M groups only changes the masks of those two groups, so the exact
change of the output error tr(D G D^T) (D = the pruned-away part of the weights) is
2 <dD, D G> + tr(dD G dD^T) on 2M columns. Every swap inside a block of positions is scored at once
(vectorised over candidates and rows), the best non-overlapping improving swaps are applied together,
and the exact loss is checked: when interactions between the accepted swaps cost more than predicted,
fewer are taken, down to the single best swap, whose predicted gain is exact. The loss never rises.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..sparse.nm import NMPattern, nm_mask
from ..sparse.permutation import check_permutation

# Elements of the [rows, candidates, 2M] temporaries evaluated at once (bounds the memory to ~100 MB).
_CHUNK_ELEMENTS = 1 << 22
# Candidates per N:M group that survive the row-sampled screening and are scored exactly.
_SCREEN_KEEP_PER_GROUP = 3
# Rounds between two screenings; in between, the shortlist is re-scored exactly (gains shift as swaps land).
_RESCREEN_EVERY = 4
# A round stops the search when it gains less than this fraction of the current loss.
_MIN_RELATIVE_GAIN = 1e-5


@dataclass
class SwapResult:
    """The refined permutation, its relative loss and the loss after every accepted round."""

    perm: torch.Tensor
    loss: float
    history: list[float] = field(default_factory=list)
    swaps: int = 0


def refine_swaps(
    weights: Sequence[torch.Tensor],
    gram: torch.Tensor,
    scores: torch.Tensor,
    perm: torch.Tensor,
    n: int,
    m: int,
    block_size: int = 64,
    rounds: int = 10,
    screen_rows: int = 128,
    seed: int = 0,
) -> SwapResult:
    """Improve `perm` by exact greedy swaps of channels between N:M groups within blocks of positions.

    `weights` ([out_l, C] each) share the input whose Gram matrix is `gram` [C, C]; `scores` [sum out, C]
    choose the masks (any positive rescaling per row gives the same masks). Swaps never cross a block of
    `block_size` positions, so a block-wise permutation stays block-wise. Each round screens every
    candidate on `screen_rows` random rows (seeded by `seed`; every few rounds), scores the shortlist
    exactly and applies the best group-disjoint swaps. Deterministic for a fixed seed; never worse than `perm`.
    """
    state = _State(torch.cat([w.detach().float() for w in weights]), gram, scores, perm, n, m)
    _check(state, block_size, rounds)
    candidates = _candidates(state.dense.shape[1], block_size, m, state.dense.device)
    generator = torch.Generator().manual_seed(seed)
    keep = _SCREEN_KEEP_PER_GROUP * state.dense.shape[1] // m
    history, swaps = [state.loss], 0
    shortlist = None
    for round_index in range(rounds):
        fresh = shortlist is None or round_index % _RESCREEN_EVERY == 0
        if fresh:
            shortlist = _screen(state, candidates, screen_rows, keep, generator)
        gains, pairs = _best_swaps(state, shortlist)
        if pairs.numel() == 0 and not fresh:  # the shortlist is exhausted: screen again before giving up
            shortlist = _screen(state, candidates, screen_rows, keep, generator)
            gains, pairs = _best_swaps(state, shortlist)
        if pairs.numel() == 0:
            break
        accepted = _accept(state, gains, pairs)
        if accepted == 0:
            break
        swaps += accepted
        history.append(state.loss)
        if history[-2] - history[-1] <= _MIN_RELATIVE_GAIN * history[-2]:
            break
    return SwapResult(state.perm.cpu(), state.loss, history, swaps)


class _State:
    """Weights, scores and Gram matrix in the current permuted order, with D and D G cached."""

    def __init__(self, dense, gram, scores, perm, n, m):
        self.dense, self.scores, self.n, self.m = dense, scores.detach().float(), n, m
        self.gram = 0.5 * (gram.detach().float() + gram.detach().float().T)
        self.norm = float((dense * (dense @ self.gram)).sum(dtype=torch.float64))
        if not self.norm > 0:
            raise ValueError("The dense layers have zero output on the calibration inputs; nothing to refine.")
        self.set_perm(perm.detach().long().to(dense.device))

    def set_perm(self, perm: torch.Tensor) -> None:
        """Move to `perm`: recompute the permuted tensors, the pruned part D, D G and the loss."""
        self.perm = perm
        self.w = self.dense[:, perm]
        self.s = self.scores[:, perm]
        self.g = self.gram[perm][:, perm]
        self.delta = self.w.masked_fill(nm_mask(self.s, self.n, self.m), 0)
        self.product = self.delta @ self.g
        self.loss = float((self.delta * self.product).sum(dtype=torch.float64)) / self.norm


def _check(state: _State, block_size: int, rounds: int) -> None:
    """Clear errors for settings the search cannot use."""
    channels = state.dense.shape[1]
    NMPattern(state.n, state.m).check_width(channels)
    check_permutation(state.perm, channels)
    if state.gram.shape != (channels, channels) or state.scores.shape != state.dense.shape:
        raise ValueError(f"gram must be [{channels}, {channels}] and scores {tuple(state.dense.shape)}.")
    if block_size % state.m != 0 or channels % block_size != 0 or block_size < 2 * state.m:
        raise ValueError(f"block_size={block_size} must divide {channels} and be a multiple of M={state.m}, at least 2M.")
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}.")


def _candidates(channels: int, block_size: int, m: int, device) -> tuple[torch.Tensor, ...]:
    """All swaps (slot a of group p) <-> (slot b of group q), p < q in one block: four [K] index tensors."""
    per_block = block_size // m
    p, q = torch.triu_indices(per_block, per_block, offset=1, device=device)
    first = torch.arange(0, channels // m, per_block, device=device).unsqueeze(-1)  # first group of each block
    p, q = (p + first).reshape(-1), (q + first).reshape(-1)
    slots = torch.arange(m, device=device)
    a, b = slots.repeat_interleave(m), slots.repeat(m)
    pairs = p.numel()
    return p.repeat_interleave(m * m), a.repeat(pairs), q.repeat_interleave(m * m), b.repeat(pairs)


def _keep(x: torch.Tensor, n: int) -> torch.Tensor:
    """nm_mask of groups on the last dim of `x` [..., M]: rank below n, ties to the lower slot."""
    m = x.shape[-1]
    earlier = torch.ones(m, m, dtype=torch.bool, device=x.device).tril(-1)  # [k, l]: l < k
    other, own = x.unsqueeze(-2), x.unsqueeze(-1)
    rank = ((other > own) | ((other == own) & earlier)).sum(-1)
    return rank < n


def _screen(state: _State, candidates, screen_rows: int, keep: int, generator) -> tuple[torch.Tensor, ...]:
    """The `keep` most promising candidates, scored on `screen_rows` random rows (all when fewer rows)."""
    rows = state.w.shape[0]
    if rows <= screen_rows or candidates[0].numel() <= keep:
        return candidates
    subset = torch.randperm(rows, generator=generator)[:screen_rows].sort().values.to(state.w.device)
    top = torch.argsort(_gains(state, candidates, subset), stable=True)[:keep]
    return tuple(c[top] for c in candidates)


def _best_swaps(state: _State, candidates) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact loss changes (< 0 only) on all rows and position pairs [k, 2] of the improving swaps, best first."""
    gains = _gains(state, candidates, None)
    better = gains < 0
    p, a, q, b = (c[better] for c in candidates)
    order = torch.argsort(gains[better], stable=True)
    pairs = torch.stack([p * state.m + a, q * state.m + b], dim=-1)
    return gains[better][order], pairs[order]


def _gains(state: _State, candidates, rows: torch.Tensor | None) -> torch.Tensor:
    """Loss change (unnormalised) of every candidate swap, on all rows or summed over `rows` and rescaled."""
    p, a, q, b = candidates
    m = state.m
    tensors = (state.w, state.s, state.delta, state.product)
    if rows is not None:
        tensors = tuple(t[rows] for t in tensors)
    w, s, d, prod = (t.unflatten(-1, (-1, m)) for t in tensors)
    chunk = max(1, _CHUNK_ELEMENTS // (w.shape[0] * 2 * m))
    gains = torch.cat(
        [
            _chunk_gains(w, s, d, prod, state.g, p[i : i + chunk], a[i : i + chunk], q[i : i + chunk], b[i : i + chunk], state.n)
            for i in range(0, p.numel(), chunk)
        ]
    )
    return gains if rows is None else gains * (state.w.shape[0] / rows.numel())


def _chunk_gains(w, s, d, prod, gram, p, a, q, b, n) -> torch.Tensor:
    """Loss change of candidates (p, a) <-> (q, b): both groups' masks recomputed on [rows, k, 2M]."""
    m = w.shape[-1]
    slot = torch.arange(m, device=w.device)
    into_p, into_q = slot == a.unsqueeze(-1), slot == b.unsqueeze(-1)  # [k, M]: where the newcomer sits

    def newcomer(t, own_group, own_slot_mask, other_group, other_slot):
        return torch.where(own_slot_mask, t[:, other_group, other_slot].unsqueeze(-1), t[:, own_group])

    new_scores = torch.cat([newcomer(s, p, into_p, q, b), newcomer(s, q, into_q, p, a)], dim=-1)
    new_w = torch.cat([newcomer(w, p, into_p, q, b), newcomer(w, q, into_q, p, a)], dim=-1)
    old_d = torch.cat([newcomer(d, p, into_p, q, b), newcomer(d, q, into_q, p, a)], dim=-1)
    old_prod = torch.cat([newcomer(prod, p, into_p, q, b), newcomer(prod, q, into_q, p, a)], dim=-1)
    keep = torch.cat([_keep(new_scores[..., :m], n), _keep(new_scores[..., m:], n)], dim=-1)
    change = new_w.masked_fill(keep, 0).sub_(old_d)  # [rows, k, 2M], by the channel's current position
    positions = torch.cat(  # [k, 2M]: the block position each changed column currently holds
        [torch.where(into_p, (q * m + b).unsqueeze(-1), p.unsqueeze(-1) * m + slot),
         torch.where(into_q, (p * m + a).unsqueeze(-1), q.unsqueeze(-1) * m + slot)], dim=-1)
    local_gram = gram[positions.unsqueeze(-1), positions.unsqueeze(-2)]  # [k, 2M, 2M]
    linear = (change * old_prod).sum(dim=(0, 2))
    quadratic = (torch.bmm(change.transpose(0, 1), local_gram) * change.transpose(0, 1)).sum(dim=(1, 2))
    return 2 * linear + quadratic


def _accept(state: _State, gains: torch.Tensor, pairs: torch.Tensor) -> int:
    """Apply the best group-disjoint swaps; halve the set until the exact loss drops. Returns the count."""
    chosen = _disjoint(pairs, state.m)
    before_perm, before_loss = state.perm, state.loss
    while chosen.numel() > 0:
        perm = before_perm.clone()
        first, second = pairs[chosen, 0], pairs[chosen, 1]
        perm[first], perm[second] = before_perm[second], before_perm[first]
        state.set_perm(perm)
        if state.loss < before_loss:
            return int(chosen.numel())
        chosen = chosen[: chosen.numel() // 2]
    state.set_perm(before_perm)
    return 0


def _disjoint(pairs: torch.Tensor, m: int) -> torch.Tensor:
    """Indices of the swaps, in order, that touch no N:M group an earlier chosen swap touched."""
    groups = (pairs // m).tolist()
    used: set[int] = set()
    chosen = []
    for index, (g1, g2) in enumerate(groups):
        if g1 not in used and g2 not in used:
            used.update((g1, g2))
            chosen.append(index)
    return torch.tensor(chosen, dtype=torch.long, device=pairs.device)
