"""The optimisation shared by both scopes: the optimiser of the block logits, the learning-rate and
temperature schedules, and the record of the best hard permutation seen."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from .parametrisation import BlockPermutation


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


def make_optimizer(modules: Iterable[BlockPermutation], kind: str, lr: float, weight_decay: float,
                   steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimiser of the blocks' logits and its cosine learning-rate schedule over `steps`.

    "normalized": NormalizedDescent; "adamw" (the paper's): AdamW with weight decay on the block logits only
    (the learnable scale is a temperature)."""
    modules = list(modules)
    if kind == "normalized":
        optimizer = NormalizedDescent([module.weight for module in modules], lr)
    elif kind == "adamw":
        scales = [module.scale for module in modules if module.scale.requires_grad]
        groups = [{"params": [module.weight for module in modules], "weight_decay": weight_decay}]
        groups += [{"params": scales, "weight_decay": 0.0}] if scales else []
        optimizer = torch.optim.AdamW(groups, lr=lr)
    else:
        raise ValueError(f"Unknown optimizer {kind!r}; valid optimizers: normalized, adamw.")
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / max(steps, 1))))
    return optimizer, schedule


def temperature(step: int, steps: int, tau: tuple[float, float]) -> float:
    """The temperature at `step` of `steps`: linear from tau[0] at the first step to tau[1] at the last."""
    return tau[0] + (tau[1] - tau[0]) * step / max(steps - 1, 1)


class BestTracker:
    """Keeps the lowest-loss hard permutation(s) seen; the first one seen is the initialisation, and a later
    one replaces the best only when strictly lower."""

    def __init__(self):
        self.best = None
        self.best_loss = math.inf
        self.best_step: int | None = None
        self.history: list[float] = []

    def update(self, perms, loss: float, step: int | None = None) -> bool:
        """Record one evaluated permutation (a tensor or a list of them); True when it is the new best."""
        self.history.append(loss)
        if loss < self.best_loss:
            self.best = perms.clone() if torch.is_tensor(perms) else [p.clone() for p in perms]
            self.best_loss, self.best_step = loss, step
            return True
        return False
