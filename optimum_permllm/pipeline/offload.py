"""Prune accelerate-offloaded decoder layers: materialise a layer from its offload store, then write it back.

A model loaded with a `device_map` that has "cpu" entries (or wrapped by `accelerate.cpu_offload`) keeps
the weights of its offloaded modules in CPU dicts read by accelerate hooks, and holds meta tensors
between forwards. For pruning, an offloaded decoder layer is loaded onto the pruning device and its
hooks removed; once pruned, its new tensors (packed weights, masks, permutations) move to the CPU and
become the store of one offloading hook on the whole layer, and the layer holds meta tensors again.
The layer's dense entries are removed from the original store as it is loaded, so the CPU holds one
copy of each layer. Weights offloaded to disk cannot be written back in place and are refused before
any work is done.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch
from accelerate.hooks import AlignDevicesHook, SequentialHook, add_hook_to_module, remove_hook_from_submodules
from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, named_module_tensors, set_module_tensor_to_device
from torch import nn

from ..nn.permuted_sparse_linear import PermutedSparseLinear

_ON_CPU = ("load it on the CPU without device_map and prune it with PermLLMSparsifier(config).sparsify_model(model, "
           "tokenizer, device='cuda'), which moves one layer at a time to the GPU.")


class PrunedLayerOffloadHook(AlignDevicesHook):
    """accelerate's offloading hook that also drops the weights PermutedSparseLinear unpacks during a forward,
    so that nothing of the layer stays on the execution device between forwards."""

    def post_forward(self, module: nn.Module, output):
        for sub in module.modules():
            if isinstance(sub, PermutedSparseLinear):
                sub.free_cache()
        return super().post_forward(module, output)


def align_hooks(module: nn.Module) -> list[AlignDevicesHook]:
    """The accelerate AlignDevicesHooks attached to `module` itself (also inside a SequentialHook)."""
    hook = getattr(module, "_hf_hook", None)
    hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
    return [h for h in hooks if isinstance(h, AlignDevicesHook)]


def offload_hooks(root: nn.Module) -> list[tuple[nn.Module, AlignDevicesHook]]:
    """(module, hook) for every hook in `root` and its submodules that keeps weights off the device."""
    return [(module, hook) for module in root.modules() for hook in align_hooks(module) if hook.offload]


def stored_names(module: nn.Module, hook: AlignDevicesHook) -> list[str]:
    """The tensor names `hook` loads from its weights_map into `module` at each forward."""
    return [name for name, _ in named_module_tensors(module, include_buffers=hook.offload_buffers,
                                                     recurse=hook.place_submodules, remove_non_persistent=True)]


def execution_device(layers) -> torch.device | None:
    """The device accelerate runs the offloaded decoder layers on, or None when no layer is offloaded."""
    hooks = [hook for layer in layers for _, hook in offload_hooks(layer)]
    if not hooks or hooks[0].execution_device is None:
        return None
    return torch.device(hooks[0].execution_device)


def check_offload(model: nn.Module, prefix: str, layers) -> None:
    """Refuse, before any change, offloading whose pruned layers cannot be written back."""
    _check_layers_offloaded_alone(model, layers)
    for index, layer in enumerate(layers):
        hooks = offload_hooks(layer)
        if _read_from_disk(hooks):
            raise ValueError(
                f"Decoder layer {prefix}.{index} is offloaded to disk by accelerate (a device_map with 'disk' "
                "entries, or disk_offload): its pruned weights cannot be written back in place. Load the model "
                "with CPU offload instead (a device_map with 'cpu' entries and no 'disk' entry), or " + _ON_CPU)
        missing = _unloaded(layer) if hooks else []
        if missing:
            raise ValueError(f"Decoder layer {prefix}.{index} has meta tensors that no accelerate hook loads: "
                             f"{missing}. Load the model with from_pretrained(..., device_map=...) so that every "
                             "weight is stored.")


def _check_layers_offloaded_alone(model: nn.Module, layers) -> None:
    """Refuse an offloading hook on a module holding decoder layers: a layer could not be written back alone."""
    members = {id(layer) for layer in layers}
    for name, module in model.named_modules():
        covers = any(h.offload and h.place_submodules for h in align_hooks(module))
        if covers and id(module) not in members and any(id(sub) in members for sub in module.modules()):
            raise ValueError(
                f"accelerate offloads {name or 'the model'!r} as one block holding the decoder layers, so a layer "
                "cannot be loaded and written back on its own. Give each decoder layer its own device_map entry "
                "(device_map='auto' does), or " + _ON_CPU)


def _read_from_disk(hooks) -> bool:
    """Whether any tensor these offloading hooks load is read from disk rather than from a CPU dict."""
    return not all(_in_memory(hook.weights_map, key) for module, hook in hooks for key in stored_names(module, hook))


def _unloaded(layer: nn.Module) -> list[str]:
    """Names of the layer's meta tensors that none of its offloading hooks loads."""
    paths = {id(module): path for path, module in layer.named_modules()}
    loaded = {f"{paths[id(module)]}.{name}".lstrip(".") for module, hook in offload_hooks(layer)
              for name in stored_names(module, hook)}
    return [name for name, tensor in named_module_tensors(layer, include_buffers=True, recurse=True)
            if tensor.is_meta and name not in loaded]


@contextmanager
def on_device(layer: nn.Module, device: torch.device):
    """Hold `layer` on `device` for pruning and put it back after; an offloaded layer is loaded from its
    offload store, and its pruned tensors become that store again."""
    hooks = offload_hooks(layer)
    if not hooks:
        home = next(layer.parameters()).device
        layer.to(device)
        try:
            yield
        finally:
            layer.to(home)
        return
    settings = materialise(layer, device)
    try:
        yield
    finally:
        write_back(layer, **settings)


@contextmanager
def on_device_together(layers, device: torch.device):
    """Hold all of `layers` on `device` at once (what `on_device` does for one), e.g. for a training that runs them
    at every step; each is put back when the block ends."""
    with ExitStack() as stack:
        for layer in layers:
            stack.enter_context(on_device(layer, device))
        yield


@torch.no_grad()
def materialise(layer: nn.Module, device: torch.device) -> dict:
    """Load an offloaded layer's tensors onto `device` and remove its hooks; returns the hook settings to restore."""
    hooks = offload_hooks(layer)
    skip_keys = next((h.skip_keys for m in layer.modules() for h in align_hooks(m) if h.skip_keys), None)
    settings = {"execution_device": hooks[0][1].execution_device, "skip_keys": skip_keys}
    remove_hook_from_submodules(layer)
    for module, hook in hooks:
        for name in stored_names(module, hook):
            set_module_tensor_to_device(module, name, device, value=hook.weights_map[name])
            _drop(hook.weights_map, name)  # the dense copy is replaced by the pruned one at write-back
    layer.to(device)
    return settings


@torch.no_grad()
def write_back(layer: nn.Module, execution_device, skip_keys=None) -> None:
    """Move the layer's tensors to a CPU dict that becomes its offload store, leaving meta tensors in the layer."""
    store = {name: tensor.detach().to("cpu") for name, tensor in
             named_module_tensors(layer, include_buffers=True, recurse=True, remove_non_persistent=True)}
    hook = PrunedLayerOffloadHook(execution_device=execution_device, offload=True, weights_map=store,
                                  offload_buffers=True, place_submodules=True, skip_keys=skip_keys)
    add_hook_to_module(layer, hook)


def _resolve(weights_map, key: str):
    """The underlying store of an accelerate weights_map and the key of `key` in it (PrefixedDataset unwrapped)."""
    while isinstance(weights_map, PrefixedDataset):
        weights_map, key = weights_map.dataset, weights_map.prefix + key
    return weights_map, key


def _in_memory(weights_map, key: str) -> bool:
    """Whether the offloaded tensor `key` is held in a CPU dict (rather than read from disk)."""
    store, key = _resolve(weights_map, key)
    if isinstance(store, OffloadedWeightsLoader):
        return key in store.state_dict
    return isinstance(store, dict)


def _drop(weights_map, key: str) -> None:
    """Remove `key` from a CPU offload store, so that its memory is freed."""
    store, key = _resolve(weights_map, key)
    if isinstance(store, OffloadedWeightsLoader):
        store.state_dict.pop(key, None)
        if key not in store.index and key in store.all_keys:
            store.all_keys.remove(key)
    elif isinstance(store, dict):
        store.pop(key, None)
