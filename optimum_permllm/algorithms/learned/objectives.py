"""What the learned permutation minimises.

- `LayerObjective` (the `layer` scope): the mean relative output error of a group's pruned linears, exact
  from the input Gram matrix, without the tokens.
- `cosine_loss` (the `model` scope): PermLLM's 1 - cosine similarity between the sparse and the dense
  model's last hidden states, per calibration window, optionally with every feature standardised first
  (`feature_scale`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


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


def cosine_loss(output: torch.Tensor, target: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """1 - cosine similarity of the last dimension, averaged over the tokens of each window: [windows]
    for `output` and `target` [windows, tokens, features] (computed in float32). `scale` [features] divides
    both first (see `feature_scale`)."""
    output, target = output.float(), target.float()
    if scale is not None:
        output, target = output / scale, target / scale
    cosine = torch.nn.functional.cosine_similarity(output, target, dim=-1)
    return 1 - cosine.flatten(1).mean(dim=1)


def feature_scale(target: torch.Tensor) -> torch.Tensor:
    """Every feature's RMS over all tokens of `target` [..., features], floored at 1e-6 of the largest (a dead
    feature must not divide by zero). Dividing by it before the cosine gives every feature of the residual
    stream the same weight: otherwise a few massive dimensions, which hold most of its energy (66-99% in 4 of
    SmolLM2's 576), decide the cosine alone."""
    rms = target.float().flatten(0, -2).pow(2).mean(dim=0).sqrt()
    return rms.clamp_min(1e-6 * float(rms.max().clamp_min(torch.finfo(torch.float32).tiny)))
