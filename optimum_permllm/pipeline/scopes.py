"""The objective of the learned permutation beyond one linear group: the `model` scope.

`ScopeObjective` is a `loss_fn` for `learn_permutation`: it receives the group's candidate pruned weights
(original column order) and returns 1 - cosine similarity, averaged over tokens, between an output
computed with those weights and the same output of the dense layer, on SCOPE_WINDOWS cached calibration
windows (the inputs of the current layer, i.e. the outputs of the already-pruned previous layers).
The cosine is taken after dividing every feature by its RMS in the dense output: an LLM's residual
stream keeps most of its energy in a few massive dimensions, and a plain cosine would see only those.

- `model`: the last hidden states, through the remaining decoder layers (dense) and the final norm
  when given; the layer's other groups stay dense, so the groups' problems are independent.
- With no later layers it is the decoder layer's own output (what research/block_scope_windows.py
  measures; as a scope of its own it did not beat the heuristic permutation: research/FINDINGS.md).

The weights are substituted with `torch.func.functional_call`, so the model is never modified; the
model's own parameters are passed detached, so no gradient accumulates in them.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..options import SCOPES
from .capture import CalibrationCache, LayerCall

# Calibration windows (sequences) a scope objective is scored on, all cached ones if fewer: enough to tell
# apart permutations whose losses differ by about 1%, at a fraction of the cost of every cached window
# (research/FINDINGS.md).
SCOPE_WINDOWS = 16


def run_call(call: LayerCall, layer: nn.Module, hidden: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """`LayerCall.run` with `params` (every parameter of `layer`, some substituted) via functional_call."""
    if call.hidden_in_kwargs:
        args, kwargs = call.args, {**call.kwargs, "hidden_states": hidden}
    else:
        args, kwargs = (hidden, *call.args[1:]), call.kwargs
    out = torch.func.functional_call(layer, params, args, kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def cosine_loss(output: torch.Tensor, target: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """1 - cosine similarity of the last dimension, averaged over all tokens; features divided by `scale` first."""
    output, target = output.float(), target.float()
    if scale is not None:
        output, target = output / scale, target / scale
    return 1 - torch.nn.functional.cosine_similarity(output, target, dim=-1).mean()


def feature_scale(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-feature RMS over every token of `outputs` (floored so that dead features do not divide by 0)."""
    flat = torch.cat([o.float().reshape(-1, o.shape[-1]) for o in outputs])
    rms = flat.pow(2).mean(dim=0).sqrt()
    return rms.clamp_min(1e-6 * float(rms.max().clamp_min(1e-30)))


class ScopeObjective:
    """1 - cos(output with the group's candidate weights, dense output), features standardised by the
    dense output's per-feature RMS, over the first cached batches that hold `windows` sequences (all if fewer).

    `names` are the group's linears (qualified inside `layer`); `later` are the decoder layers run
    after `layer` (empty: the layer's own output) with their indices, and `final_norm` the module applied
    to the last hidden states (model scope only, optional).
    """

    def __init__(self, layer: nn.Module, index: int, cache: CalibrationCache, names: Sequence[str],
                 windows: int = SCOPE_WINDOWS, later: Sequence[tuple[int, nn.Module]] = (),
                 final_norm: nn.Module | None = None):
        if windows < 1 or not cache.hidden:
            raise ValueError(f"A scope objective needs windows >= 1 (got {windows}) and cached calibration batches "
                             f"({len(cache.hidden)} cached).")
        self.layer, self.index, self.names = layer, index, list(names)
        self.later, self.final_norm = list(later), final_norm
        self.hidden = _first_windows(cache.hidden, windows)
        self.calls = {(i, h.shape[0]): cache.call_for(i, h) for h in self.hidden for i in [index, *[j for j, _ in later]]}
        self.params = {name: p.detach() for name, p in layer.named_parameters()}
        with torch.no_grad():
            self.targets = [self._forward(self.params, h) for h in self.hidden]
        self.scale = feature_scale(self.targets)

    def _forward(self, params: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
        """The scope's output for one batch with the current layer's `params`."""
        out = run_call(self.calls[(self.index, hidden.shape[0])], self.layer, hidden, params)
        for j, module in self.later:
            out = run_call(self.calls[(j, out.shape[0])], module, out,
                           {name: p.detach() for name, p in module.named_parameters()})
        return self.final_norm(out) if self.final_norm is not None else out

    def __call__(self, masked_weights: Sequence[torch.Tensor]) -> torch.Tensor:
        """The mean cosine loss of the candidate pruned weights (original column order)."""
        if len(masked_weights) != len(self.names):
            raise ValueError(f"Expected {len(self.names)} weights for {self.names}, got {len(masked_weights)}.")
        params = dict(self.params)
        for name, weight in zip(self.names, masked_weights):
            params[f"{name}.weight"] = weight.to(self.params[f"{name}.weight"].dtype)
        losses = [cosine_loss(self._forward(params, h), t, self.scale) for h, t in zip(self.hidden, self.targets)]
        return torch.stack(losses).mean()


def _first_windows(hidden: Sequence[torch.Tensor], windows: int) -> list[torch.Tensor]:
    """The first batches of `hidden` that together hold at least `windows` sequences (all if fewer)."""
    kept, count = [], 0
    for batch in hidden:
        if count >= windows:
            break
        kept.append(batch)
        count += batch.shape[0]
    return kept


def scope_loss_fn(scope: str, layer: nn.Module, index: int, cache: CalibrationCache, names: Sequence[str],
                  windows: int = SCOPE_WINDOWS, later_layers: Sequence[nn.Module] = (), final_norm: nn.Module | None = None):
    """The `loss_fn` of `scope` for one group, or None for `layer` (learn_permutation's exact Gram objective).

    `later_layers` are all the decoder layers after `index` (the `model` scope runs them).
    """
    if scope not in SCOPES:
        raise ValueError(f"Unknown scope {scope!r}; valid scopes: {', '.join(SCOPES)}.")
    if scope == "layer":
        return None
    return ScopeObjective(layer, index, cache, names, windows, list(enumerate(later_layers, start=index + 1)), final_norm)
