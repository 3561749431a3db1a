"""The transformers HfQuantizer for quant_method="permllm", registered when optimum_permllm is imported.

- Dense checkpoint + PermLLMConfig: the model loads densely, then is pruned (like GPTQ's integration).
- permllm checkpoint: PermutedSparseLinear modules are put in place before the weights load, for exactly
  the layers whose packed tensors the checkpoint holds; missing tensors are an error, never random weights.
"""

from __future__ import annotations

import logging
import torch

from transformers.quantizers import register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.base import HfQuantizer

from ..config import PermLLMConfig
from ..sparsifier import PermLLMSparsifier

logger = logging.getLogger(__name__)

_SPARSE_KEYS = ("weight", "weight_mask", "input_perm")


class PermLLMHfQuantizer(HfQuantizer):
    """Drives PermLLMSparsifier from `from_pretrained`."""

    requires_calibration = False

    def __init__(self, quantization_config: PermLLMConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.sparsifier = PermLLMSparsifier(quantization_config)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if self.pre_quantized:
            names = sparse_layer_names(checkpoint_files, self.quantization_config)
            self.sparsifier.convert_model(model, names, permuted_norm_names(checkpoint_files))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
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


def sparse_layer_names(checkpoint_files, config: PermLLMConfig) -> list[str]:
    """Names of the sparse layers a checkpoint holds, read from its safetensors headers.

    Raises a clear error when a sparse layer lacks one of its tensors (a truncated or edited checkpoint).
    """
    keys = _checkpoint_keys(checkpoint_files)
    if keys is None:
        if config.converted_modules is None:
            raise ValueError("This permllm checkpoint lists no sparse layers and has no safetensors files to read them from.")
        return list(config.converted_modules)
    names = sorted(k[: -len(".weight_mask")] for k in keys if k.endswith(".weight_mask"))
    expected = set(config.converted_modules or names)
    missing = [f"{n}.{t}" for n in sorted(expected | set(names)) for t in _SPARSE_KEYS if f"{n}.{t}" not in keys]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(
            f"This permllm checkpoint is incomplete: missing {shown}. It may have been truncated while saving; "
            "save it again from the sparse model."
        )
    return sorted(expected | set(names))


def permuted_norm_names(checkpoint_files) -> list[str]:
    """Norms the checkpoint stores with an `output_perm` (permutations folded into the norm)."""
    keys = _checkpoint_keys(checkpoint_files) or set()
    return sorted(k[: -len(".output_perm")] for k in keys if k.endswith(".output_perm"))


def _checkpoint_keys(checkpoint_files) -> set[str] | None:
    """All tensor names in the checkpoint's safetensors files (headers only), or None if none are safetensors."""
    files = [str(f) for f in (checkpoint_files or []) if str(f).endswith(".safetensors")]
    if not files:
        return None
    from safetensors import safe_open

    keys: set[str] = set()
    for path in files:
        try:
            with safe_open(path, framework="pt") as handle:
                keys.update(handle.keys())
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
