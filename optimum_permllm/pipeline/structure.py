"""Find, from a model's module tree alone, the decoder layers and the linear layers to prune.

One code path serves every decoder family: the decoder stack is the longest nn.ModuleList of
identical blocks that contain nn.Linear layers (model.layers, model.decoder.layers, gpt_neox.layers,
transformer.h, ...).
"""

from __future__ import annotations

import difflib

from torch import nn


class StructureError(ValueError):
    """The model's layout is not one the sparsifier can work on."""


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (qualified name, ModuleList) of the decoder stack."""
    best = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(block) for block in module}
        has_linear = any(isinstance(sub, nn.Linear) for sub in module[0].modules())
        if len(kinds) == 1 and has_linear and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise StructureError(
            f"Could not find the decoder layers of {type(model).__name__}: no nn.ModuleList of identical blocks "
            "containing nn.Linear layers. optimum-permllm prunes decoder-only models built from nn.Linear "
            "(LLaMA, Qwen2, Gemma, Mistral, OPT, GPT-NeoX, ...)."
        )
    return best


def matches_any(name: str, patterns: list[str]) -> bool:
    """True when a pattern is whole dotted parts of `name`: the name itself, a parent module ('model.layers.0',
    'self_attn') or the end of a name ('o_proj' skips every o_proj, 'mlp.down_proj' every down_proj)."""
    dotted = f".{name}."
    return any(f".{pattern}." in dotted for pattern in patterns)


def check_patterns_match(model: nn.Module, patterns: list[str]) -> None:
    """Refuse a modules_to_not_convert entry that names no module of the model (a typo would otherwise prune the
    layers it meant to keep), suggesting the module names closest to it."""
    names = [name for name, _ in model.named_modules() if name]
    unmatched = [p for p in patterns if not any(matches_any(name, [p]) for name in names)]
    if not unmatched:
        return
    # candidates: every module name and every ending of one that does not start with a layer index
    endings = {".".join(parts[i:]) for parts in (n.split(".") for n in names) for i in range(len(parts))
               if i == 0 or not parts[i].isdigit()}
    described = []
    for pattern in unmatched:
        close = difflib.get_close_matches(pattern, sorted(endings), n=3, cutoff=0.6)
        described.append(repr(pattern) + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
    raise ValueError(
        f"modules_to_not_convert: no module of {type(model).__name__} matches {', '.join(described)}. Give a "
        "module's name, a parent's ('model.layers.0', 'self_attn') or the end of names ('o_proj', 'mlp.down_proj'); "
        "`print(model)` shows them."
    )


def prunable_linears(model: nn.Module, skip: list[str] | None = None, layers_prefix: str | None = None) -> dict[str, nn.Linear]:
    """All nn.Linear modules inside the decoder stack, by qualified name, minus the skipped ones (a skipped name
    that matches no module is an error)."""
    prefix = find_decoder_layers(model)[0] if layers_prefix is None else layers_prefix
    skip = list(skip or [])
    check_patterns_match(model, skip)
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(prefix + ".") and not matches_any(name, skip)
    }


def layer_linears(layer: nn.Module, skip: list[str] | None = None, layer_name: str = "") -> dict[str, nn.Linear]:
    """The nn.Linear modules of one decoder layer, by name relative to the layer."""
    skip = list(skip or [])
    return {
        name: module
        for name, module in layer.named_modules()
        if isinstance(module, nn.Linear) and not matches_any(f"{layer_name}.{name}" if layer_name else name, skip)
    }


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `name` with `module`."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def attention_heads(model_config) -> tuple[int, int, int] | None:
    """(num_heads, num_kv_heads, head_dim) from a transformers config, or None when it does not say."""
    heads = getattr(model_config, "num_attention_heads", None)
    hidden = getattr(model_config, "hidden_size", None)
    if not isinstance(heads, int) or heads < 1:
        return None
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or (hidden // heads if isinstance(hidden, int) else None)
    if not isinstance(head_dim, int) or head_dim < 1 or heads % kv_heads != 0:
        return None
    return heads, kv_heads, head_dim
