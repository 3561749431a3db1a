"""Undo a prune that failed halfway: put back every module, parameter and buffer the model had before."""

from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def restored_on_error(model: nn.Module):
    """Run the block; if it raises, give every module of `model` back its original children, parameters and
    buffers (the very objects, with the tensors they held), then re-raise.

    Pruning replaces modules and rebinds tensors (`.data = ...`) but never writes into the original tensors,
    so keeping references is enough: nothing is copied. The offload stores and hooks of an accelerate-offloaded
    layer are not part of this: a failure inside such a layer is not undone."""
    saved = [(module, dict(module._modules), dict(module._parameters), dict(module._buffers),
              {name: t.data for name, t in {**module._parameters, **module._buffers}.items() if t is not None})
             for module in model.modules()]
    try:
        yield
    except BaseException:
        for module, children, parameters, buffers, data in saved:
            module._modules.clear()
            module._modules.update(children)
            module._parameters.clear()
            module._parameters.update(parameters)
            module._buffers.clear()
            module._buffers.update(buffers)
            for name, tensor in {**parameters, **buffers}.items():
                if tensor is not None and tensor.data is not data[name]:
                    tensor.data = data[name]
        raise
