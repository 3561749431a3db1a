"""RIA-style handcrafted channel permutation (the "+CP" baseline): quantile dealing, then per-slot LSA.

The objective is the retained score: the sum of the scores an N:M mask keeps when the groups are taken
in permuted order. A group's retained score only depends on its own M channels, so re-assigning the
channels of one slot (position inside the group) between groups is a linear sum assignment whose
optimum can never be worse than leaving them where they are.
"""

from __future__ import annotations

import torch

from ..sparse.nm import NMPattern
from ..sparse.permutation import check_permutation, expand_head_blocks, identity_permutation


def retained_score(scores: torch.Tensor, perm: torch.Tensor, n: int, m: int) -> float:
    """Sum of the scores kept by the N:M mask of `scores[:, perm]` (top-n of every m permuted columns)."""
    check_permutation(perm, scores.shape[-1])
    grouped = _grouped(scores.float()[:, perm.to(scores.device).long()], m)
    return float(grouped.topk(n, dim=-1).values.sum(dtype=torch.float64))


def heuristic_permutation(
    scores: torch.Tensor, n: int, m: int, lsa_rounds: int = 1, max_groups_per_lsa: int | None = None
) -> torch.Tensor:
    """A permutation of the input channels of `scores` [out, in] that raises the retained N:M score.

    Scores of layers sharing one input may be concatenated along dim 0. The result is never worse than
    the identity on `retained_score`: every candidate is scored and the best one is returned.
    `max_groups_per_lsa` splits each slot's assignment into strided blocks of at most that many groups
    (cost out * G * block instead of out * G^2 for G = in / m groups), for wide layers on a CPU.
    """
    _check_inputs(scores, n, m, lsa_rounds, max_groups_per_lsa)
    scores = scores.detach().float()
    identity = identity_permutation(scores.shape[1], device=scores.device)
    if scores.shape[1] == m:
        return identity
    best, best_score = identity, retained_score(scores, identity, n, m)
    current = quantile_deal(scores, m)
    current_score = retained_score(scores, current, n, m)
    for _ in range(lsa_rounds):
        round_start = current_score
        for slot in range(m):
            candidate = _reassign_slot(scores, current, slot, n, m, max_groups_per_lsa)
            candidate_score = retained_score(scores, candidate, n, m)
            if candidate_score > current_score:
                current, current_score = candidate, candidate_score
        if current_score <= round_start:
            break
    return current if current_score > best_score else best


def head_shared_permutation(scores: torch.Tensor, num_heads: int, num_kv_heads: int, n: int, m: int) -> torch.Tensor:
    """`heuristic_permutation` restricted to moves inside each attention head, shared by a KV head's query heads.

    Such a permutation of o_proj's input can be folded into v_proj's rows. Query heads sharing a KV
    head must be permuted alike, so their score columns are stacked as extra rows of one [rows, head_dim]
    problem per KV head; the retained score of the whole layer is the sum of those problems' scores.
    """
    width = scores.shape[-1]
    if num_heads % num_kv_heads != 0 or width % num_heads != 0 or (width // num_heads) % m != 0:
        raise ValueError(
            f"A head-shared permutation needs {num_heads} heads dividing the width {width} into heads of a "
            f"multiple of M={m} channels, and {num_kv_heads} KV heads dividing {num_heads}."
        )
    head_dim = width // num_heads
    per_head = scores.reshape(scores.shape[0], num_heads, head_dim).transpose(0, 1)  # [heads, out, head_dim]
    stacked = per_head.reshape(num_kv_heads, -1, head_dim)  # query heads of one KV head stacked as rows
    blocks = torch.stack([heuristic_permutation(problem, n, m) for problem in stacked])
    return expand_head_blocks(blocks, num_heads)


def quantile_deal(scores: torch.Tensor, m: int) -> torch.Tensor:
    """Sort channels by summed score and give every group one channel of each of the M quantiles.

    Quantile k fills slot k of the groups, in ascending order for even k and descending for odd k,
    so a group with a weak channel in one slot gets a strong one in the next.
    """
    order = torch.sort(scores.float().sum(0), stable=True).indices
    quantiles = order.reshape(m, -1).clone()
    quantiles[1::2] = quantiles[1::2].flip(1)
    return quantiles.T.reshape(-1)


def _reassign_slot(
    scores: torch.Tensor, perm: torch.Tensor, slot: int, n: int, m: int, max_groups: int | None
) -> torch.Tensor:
    """Optimally re-deal the channels sitting in `slot` among the groups, the other slots held fixed."""
    from scipy.optimize import linear_sum_assignment  # here: scipy.optimize takes ~0.25 s to import

    grouped = _grouped(scores[:, perm], m)
    num_groups = grouped.shape[1]
    num_blocks = 1 if max_groups is None else -(-num_groups // max_groups)
    groups = perm.reshape(-1, m).clone()
    for block in range(num_blocks):
        members = torch.arange(block, num_groups, num_blocks, device=perm.device)
        gain = _slot_gain_matrix(grouped[:, members], slot, n)
        _, source = linear_sum_assignment(gain.cpu().double().numpy(), maximize=True)
        groups[members, slot] = perm.reshape(-1, m)[members[torch.as_tensor(source, device=perm.device)], slot]
    return groups.reshape(-1)


def _slot_gain_matrix(grouped: torch.Tensor, slot: int, n: int) -> torch.Tensor:
    """gain[g, c]: how much group g's retained score grows when it receives the `slot` channel of group c.

    With t = the n-th largest of g's other M-1 scores in a row, adding value v to them keeps
    top-n(others) + max(0, v - t). Summed over rows, max(0, v - t) = (v - t + |v - t|) / 2, and the
    sum of |v - t| over rows is an L1 distance, so the whole [G, G] matrix is one `torch.cdist`.
    The LSA cost "minus the retained score of g" differs from -gain only by a per-group constant.
    """
    m = grouped.shape[-1]
    others = grouped[..., [k for k in range(m) if k != slot]]
    thresholds = others.topk(n, dim=-1).values[..., -1]  # [out, G]
    incoming = grouped[..., slot]  # [out, G]
    distance = torch.cdist(thresholds.T.contiguous(), incoming.T.contiguous(), p=1)
    return 0.5 * (incoming.sum(0).unsqueeze(0) - thresholds.sum(0).unsqueeze(1) + distance)


def _grouped(scores: torch.Tensor, m: int) -> torch.Tensor:
    """View [out, in] as [out, in / m, m]."""
    return scores.reshape(scores.shape[0], -1, m)


def _check_inputs(scores: torch.Tensor, n: int, m: int, lsa_rounds: int, max_groups: int | None) -> None:
    """Clear errors for inputs the permutation search cannot use."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [out, in] (concatenate a group's layers along dim 0), got {tuple(scores.shape)}.")
    NMPattern(n, m).check_width(scores.shape[1])
    if lsa_rounds < 0:
        raise ValueError(f"lsa_rounds must be >= 0, got {lsa_rounds}.")
    if max_groups is not None and max_groups < 2:
        raise ValueError(f"max_groups_per_lsa must be None (one assignment over all groups) or >= 2, got {max_groups}.")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contain NaN or infinity: check the calibration statistics of this layer.")
