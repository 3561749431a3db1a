"""SparseGPT N:M pruning (Frantar & Alistarh 2023): choose the mask and update the kept weights.

Follows the reference `fasterprune`: columns are visited left to right in lazy blocks; at the start
of every N:M group the M-N weights with the smallest w^2 / [H^-1]_jj^2 are pruned, and each pruned
column's error is propagated to the columns not yet visited through the upper Cholesky factor of H^-1.
The column loop is sequential by nature (each column depends on the updates of the previous ones);
everything inside it is vectorised over the output rows.
"""

from __future__ import annotations

import torch

from ..sparse.nm import NMPattern
from ..sparse.permutation import check_permutation


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    n: int,
    m: int,
    perm: torch.Tensor | None = None,
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune `weight` [out, in] to N:M with SparseGPT; returns (pruned weight in its dtype, bool mask).

    With `perm`, the layer is pruned in permuted column order and both outputs are in that order.
    """
    _check_inputs(weight, hessian, n, m, block_size)
    w = weight.detach().float().clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float32).clone()
    if perm is not None:
        check_permutation(perm, w.shape[1])
        perm = perm.to(w.device).long()
        w, h = w[:, perm], h[perm][:, perm]
    h, w = _handle_dead_features(h, w)
    hinv = _inverse_hessian_cholesky(h, damp)
    pruned, mask = _prune_columns(w, hinv, n, m, block_size)
    return pruned.masked_fill(~mask, 0).to(weight.dtype), mask


def _check_inputs(weight: torch.Tensor, hessian: torch.Tensor, n: int, m: int, block_size: int) -> None:
    """Reject shapes and settings that cannot give an N:M result."""
    if weight.dim() != 2:
        raise ValueError(f"sparsegpt_prune expects a 2-D weight [out, in], got shape {tuple(weight.shape)}.")
    NMPattern(n, m).check_width(weight.shape[1])
    columns = weight.shape[1]
    if hessian.shape != (columns, columns):
        raise ValueError(f"Hessian has shape {tuple(hessian.shape)}, expected ({columns}, {columns}) for this weight.")
    if block_size <= 0 or block_size % m != 0:
        raise ValueError(f"block_size={block_size} must be a positive multiple of M={m} so no group straddles two blocks.")


def _handle_dead_features(h: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features never active in calibration (diag H == 0): zero their weights, put 1 on the diagonal."""
    dead = torch.diagonal(h) == 0
    if bool(dead.any()):
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
    return h, w


def _inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1."""
    diagonal = torch.diagonal(h)
    diagonal += damp * diagonal.mean()
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if int(info) != 0:
        raise RuntimeError(
            f"SparseGPT: the damped Hessian (damp={damp}) of this layer is not positive definite, so its Cholesky "
            "factorisation failed. Raise the dampening, e.g. PermLLMConfig(damp=0.1) (`permllm prune --damp 0.1`), "
            "or calibrate on more text (num_samples, seq_len): the Hessian is rank-deficient."
        )
    return upper


def _prune_columns(w: torch.Tensor, hinv: torch.Tensor, n: int, m: int, block_size: int):
    """The lazy-block sweep of fasterprune; returns (updated weight, bool mask with True = kept)."""
    columns = w.shape[1]
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block, errors = _prune_block(w[:, start:end].clone(), hinv[start:end, start:end], pruned[:, start:end], n, m)
        w[:, start:end] = block
        w[:, end:] -= errors @ hinv[start:end, end:]
    return w, ~pruned


def _prune_block(block: torch.Tensor, hinv: torch.Tensor, pruned: torch.Tensor, n: int, m: int):
    """Prune one block column by column, filling `pruned` in place; returns (quantised block, scaled errors)."""
    hinv_diag = torch.diagonal(hinv)
    result = torch.zeros_like(block)
    errors = torch.zeros_like(block)
    for i in range(block.shape[1]):
        if i % m == 0:
            saliency = block[:, i : i + m].square() / hinv_diag[i : i + m].square()
            drop = torch.topk(saliency, m - n, dim=1, largest=False).indices
            pruned[:, i : i + m].scatter_(1, drop, True)
        column = block[:, i]
        kept = column.masked_fill(pruned[:, i], 0.0)
        result[:, i] = kept
        error = (column - kept) / hinv[i, i]
        block[:, i:] -= error.unsqueeze(1) * hinv[i, i:].unsqueeze(0)
        errors[:, i] = error
    return result, errors
