"""The transformers HfQuantizer for quant_method="permllm"; registered when this module is imported
(optimum_permllm imports it once transformers has loaded its quantizer registry).

- Dense checkpoint + PermLLMConfig: the model loads densely, then is pruned (like GPTQ's integration).
- permllm checkpoint: PermutedSparseLinear modules are put in place before the weights load, for exactly
  the layers whose packed tensors the checkpoint holds; a missing tensor of a sparse layer or a permuted
  norm (a bias, a norm's weight) or a tensor of the wrong shape is an error, never zeros or random weights.
  After loading, every permutation, mask and dtype is checked (`nn/validation.py`), and so are the recorded
  readers of each permuted norm (`pipeline/norm_readers.py`, one probe forward).
"""

from __future__ import annotations

import torch

from transformers.quantizers import register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.base import HfQuantizer

from ..config import PermLLMConfig
from ..nn.validation import CheckpointError, check_sparse_modules
from ..pipeline.norm_readers import check_norm_readers
from ..sparsifier import PermLLMSparsifier

class PermLLMHfQuantizer(HfQuantizer):
    """Drives PermLLMSparsifier from `from_pretrained`."""

    requires_calibration = False

    def __init__(self, quantization_config: PermLLMConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.sparsifier = PermLLMSparsifier(quantization_config)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if self.pre_quantized:
            shapes = checkpoint_shapes(checkpoint_files)  # safetensors headers, read once
            names = sparse_layer_names(shapes, self.quantization_config)
            norms = permuted_norm_names(shapes, self.quantization_config)
            self.sparsifier.convert_model(model, names, norms)
            check_stored_tensors(model, names + norms, shapes, self.quantization_config)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            check_sparse_modules(model, getattr(model, "name_or_path", None))
            check_norm_readers(model, getattr(model, "name_or_path", None))
        else:
            self.sparsifier.sparsify_model(model, self.quantization_config.tokenizer or model.name_or_path)
        return model

    def _dequantize(self, model, dtype=None):
        model = PermLLMSparsifier.dequantize_model(model)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype  # transformers may pass "float32"
        if dtype is not None and any(p.dtype != dtype for p in model.parameters() if p.is_floating_point()):
            model.to(dtype)
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def sparse_layer_names(shapes: dict[str, list[int]] | None, config: PermLLMConfig) -> list[str]:
    """Names of the sparse layers a checkpoint holds, from its tensor `shapes` (`checkpoint_shapes`; None
    without safetensors files: then the config's list). Their tensors are checked by `check_stored_tensors`."""
    keys = shapes
    if keys is None:
        if config.converted_modules is None:
            raise ValueError("This permllm checkpoint lists no sparse layers and has no safetensors files to read them from.")
        return list(config.converted_modules)
    names = {k[: -len(".weight_mask")] for k in keys if k.endswith(".weight_mask")}
    return sorted(set(config.converted_modules or ()) | names)


def permuted_norm_names(shapes: dict[str, list[int]] | None, config: PermLLMConfig | None = None) -> list[str]:
    """Norms the checkpoint stores with an `output_perm` (permutations folded into the norm), and those the config
    records as permuted."""
    keys = shapes
    recorded = set(getattr(config, "permuted_norms", None) or ())
    if keys is None:  # no safetensors headers to read: trust the config
        return sorted(recorded)
    names = {k[: -len(".output_perm")] for k in keys if k.endswith(".output_perm")}
    return sorted(names | recorded)


def check_stored_tensors(model, module_names: list[str], shapes: dict[str, tuple] | None,
                         config: PermLLMConfig) -> None:
    """Refuse a checkpoint that lacks a tensor of a converted module (transformers would fill it with zeros or
    uninitialised memory), or stores one with another shape, naming the module, the tensor and, for packed
    values, the sparsity they imply (transformers' own size-mismatch error would not say why)."""
    if shapes is None:
        return
    expected = {name: model.get_submodule(name).state_dict(keep_vars=True) for name in module_names}
    _refuse_missing([f"{name}.{key}" for name, tensors in expected.items() for key in tensors
                     if f"{name}.{key}" not in shapes])
    problems = []
    for name, tensors in expected.items():
        module = model.get_submodule(name)
        for key, tensor in tensors.items():
            stored = shapes[f"{name}.{key}"]
            if tuple(stored) != tuple(tensor.shape):
                problems.append(f"{name}.{key} has shape {tuple(stored)} in the checkpoint, but the model expects "
                                f"{tuple(tensor.shape)}{_sparsity_hint(module, key, stored, config)}")
    if problems:
        raise CheckpointError(problems)


def _sparsity_hint(module, key: str, stored, config: PermLLMConfig) -> str:
    """For packed values of another width: the fraction of weights they hold, against the config's sparsity."""
    if key != "weight" or not hasattr(module, "in_features") or len(stored) != 2:
        return ""
    return (f": it holds {stored[1]} of {module.in_features} weights per row, but the config says "
            f"sparsity={config.sparsity!r} ({module.in_features * module.n // module.m} per row), so the config "
            "does not match the tensors")


def _refuse_missing(missing: list[str]) -> None:
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(
            f"This permllm checkpoint is incomplete: missing {shown}. It may have been truncated while saving; "
            "save it again from the sparse model."
        )


def checkpoint_shapes(checkpoint_files) -> dict[str, list[int]] | None:
    """The shape of every tensor in the checkpoint's safetensors files (headers only), or None if none are
    safetensors."""
    files = [str(f) for f in (checkpoint_files or []) if str(f).endswith(".safetensors")]
    if not files:
        return None
    from safetensors import safe_open

    keys: dict[str, list[int]] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as handle:
                keys.update((key, handle.get_slice(key).get_shape()) for key in handle.keys())
        except Exception as error:  # safetensors raises its own error type for damaged files
            raise ValueError(
                f"Cannot read {path}: the file is damaged or was truncated while saving ({error}). "
                "Save the sparse model again."
            ) from error
    return keys


def register() -> None:
    """Register the config and quantizer with transformers (idempotent)."""
    if "permllm" not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config("permllm")(PermLLMConfig)
    if "permllm" not in AUTO_QUANTIZER_MAPPING:
        register_quantizer("permllm")(PermLLMHfQuantizer)


# Registered by the import, so that an import of this module that itself loads the module the registration changes
# (optimum_permllm/__init__.py runs the registration just after that load) still ends registered.
register()
