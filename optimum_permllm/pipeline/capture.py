"""Capture what the decoder layers receive, so each layer can be run on its own.

Every decoder layer is called with the hidden states plus keyword arguments that depend only on the
batch shape (attention masks, rotary embeddings, ...) and may differ between layers (sliding-window
layers get their own mask). We record, per layer and per batch shape, the call with its hidden states
replaced by a placeholder, and the hidden states that enter the first layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted inputs are recorded."""


@dataclass
class LayerCall:
    """How a decoder layer is called, less its hidden states: positional args and keyword args."""

    args: tuple
    kwargs: dict
    hidden_in_kwargs: bool

    def run(self, layer: nn.Module, hidden: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Run `layer` on `hidden` with the recorded arguments; return its output hidden states. `params`
        (every parameter of `layer` by name, some substituted) runs it through torch.func.functional_call."""
        if self.hidden_in_kwargs:
            args, kwargs = self.args, {**self.kwargs, "hidden_states": hidden}
        else:
            args, kwargs = (hidden, *self.args[1:]), self.kwargs
        out = layer(*args, **kwargs) if params is None else torch.func.functional_call(layer, params, args, kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class CalibrationCache:
    """Hidden states entering the current layer (one tensor per batch) and each layer's call per batch size."""

    hidden: list[torch.Tensor]
    calls: dict[tuple[int, int], LayerCall] = field(default_factory=dict)  # (layer index, batch size) -> call

    def call_for(self, layer_index: int, hidden: torch.Tensor) -> LayerCall:
        return self.calls[(layer_index, hidden.shape[0])]

    def to(self, device) -> CalibrationCache:
        """Move the hidden states and every tensor in the recorded calls to `device`."""
        calls = {key: LayerCall(_move(c.args, device), _move(c.kwargs, device), c.hidden_in_kwargs)
                 for key, c in self.calls.items()}
        return CalibrationCache([h.to(device) for h in self.hidden], calls)


def _move(value, device):
    """Tensors (also inside tuples, lists and dicts) moved to `device`; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_move(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value


def _split_call(args: tuple, kwargs: dict) -> tuple[LayerCall, torch.Tensor]:
    """Separate the hidden states from the other arguments of a layer call."""
    if args:
        hidden = args[0]
        kwargs = {k: v for k, v in kwargs.items() if k not in ("use_cache", "past_key_values", "past_key_value")}
        return LayerCall((None, *args[1:]), kwargs, hidden_in_kwargs=False), hidden
    hidden = kwargs["hidden_states"]
    rest = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "use_cache", "past_key_values", "past_key_value")}
    return LayerCall((), rest, hidden_in_kwargs=True), hidden


@torch.no_grad()
def capture(model: nn.Module, layers: nn.ModuleList, samples: torch.Tensor, batch_size: int, device) -> CalibrationCache:
    """Run the dense model on the calibration samples far enough to record every layer's inputs."""
    hidden: list[torch.Tensor] = []
    calls: dict[tuple[int, int], LayerCall] = {}

    def record(index):
        def hook(module, args, kwargs):
            call, states = _split_call(args, kwargs)
            calls.setdefault((index, states.shape[0]), call)
            if index == 0:
                hidden.append(states)
            if index == len(layers) - 1 or (index == 0 and probed):
                raise _StopForward

        return hook

    handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    probed_sizes: set[int] = set()
    try:
        for batch in samples.split(batch_size):
            # The first batch of each size runs through every layer to record each layer's call.
            probed = batch.shape[0] in probed_sizes
            probed_sizes.add(batch.shape[0])
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return CalibrationCache(hidden=hidden, calls=calls)
