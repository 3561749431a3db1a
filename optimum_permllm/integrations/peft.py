"""LoRA on PermutedSparseLinear for PEFT, in the manner of `peft/tuners/lora/torchao.py`.

Importing this module (optimum_permllm imports it once PEFT has loaded its LoRA module) calls `register()`,
which puts `dispatch_permllm` in front of PEFT's own LoRA dispatchers, so
`peft.get_peft_model(sparse_model, LoraConfig(target_modules=[...]))` and `PeftModel.from_pretrained(sparse_model, adapter_dir)` wrap sparse layers with no extra call.
(PEFT's `LoraConfig._register_custom_module` is per config object and is lost when an adapter
config is read back from disk, so it cannot serve `PeftModel.from_pretrained`.)

The base layer reads the ORIGINAL input order and permutes it itself, so the LoRA branch sees the
same un-permuted input as a plain nn.Linear would: y = sparse(x) + B(A(x)) * scaling.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from peft.tuners.lora import model as lora_model
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from ..nn.permuted_sparse_linear import PermutedSparseLinear

logger = logging.getLogger(__name__)

_MARK = "_permllm_dispatch"


class PermutedSparseLoraLinear(LoraLinear):
    """LoRA adapter on a PermutedSparseLinear; merging keeps the layer's exact N:M pattern.

    A merge adds the update B @ A * scaling to the dense weight and re-applies the layer's own mask in
    permuted order, so pruned weights stay zero: the part of the update that falls on pruned positions
    is DROPPED (the merged model differs from the unmerged one by exactly that part). Unmerging
    subtracts the kept part again (exact up to floating-point rounding).
    """

    def __init__(self, base_layer, adapter_name: str, config, **kwargs: Any):
        _check_plain_lora(config)
        if config.fan_in_fan_out:
            raise ValueError("fan_in_fan_out=True is for Conv1D weights; PermutedSparseLinear is [out, in]: set it to False.")
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def _get_in_out_features(self, module: torch.nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    @property
    def lora_variants(self):
        return {(): None}

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge adapters into the packed weight, masked with the layer's own N:M mask."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self.lora_A:
                continue
            self._apply_delta(self.get_delta_weight(adapter), safe_merge, adapter)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Take the (masked) merged updates out of the packed weight again."""
        if not self.merged:
            logger.warning("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_A:
                self._apply_delta(-self.get_delta_weight(adapter), False, adapter)

    @torch.no_grad()
    def _apply_delta(self, delta: torch.Tensor, safe_merge: bool, adapter: str) -> None:
        """Add `delta` ([out, in], original order) on the kept positions, then re-pack the layer."""
        base: PermutedSparseLinear = self.get_base_layer()
        perm, mask = base.input_perm, base.permuted_mask()
        permuted_delta = delta.to(base.weight.device, torch.float32)[:, perm]
        merged = (base.permuted_dense_weight().float() + permuted_delta).masked_fill(~mask, 0)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs or infinities in the merged weights: the adapter {adapter!r} seems to be broken.")
        dropped = permuted_delta.masked_fill(mask, 0).norm() / permuted_delta.norm().clamp_min(1e-30)
        logger.info("LoRA merge of %r: %.1f%% of the update norm fell on pruned weights and was dropped.",
                    adapter, 100 * float(dropped))
        base.load_packed(merged.to(base.weight.dtype), perm, mask=mask)

    def __repr__(self) -> str:
        return super().__repr__().replace("lora.Linear", f"lora.{type(self).__name__}", 1)


def _check_plain_lora(config) -> None:
    """Refuse LoRA variants whose forward or merge needs the dense base weight (DoRA, lora_bias, ...)."""
    if getattr(config, "use_dora", False):
        raise ValueError("DoRA is not supported on PermutedSparseLinear (it needs the dense weight norm): use_dora=False.")
    if getattr(config, "lora_bias", False):
        raise ValueError("lora_bias is not supported on PermutedSparseLinear: set lora_bias=False.")


def dispatch_permllm(target: torch.nn.Module, adapter_name: str, config, **kwargs: Any):
    """PEFT dispatcher: a PermutedSparseLoraLinear for a PermutedSparseLinear target, else None."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base, PermutedSparseLinear):
        return None
    if kwargs.pop("parameter_name", None) is not None:
        raise ValueError("LoraConfig(target_parameters=...) cannot target a PermutedSparseLinear's packed weight: "
                         "use target_modules instead.")
    for key in ("get_apply_tensor_subclass", "gptq_quantization_config", "aqlm_quantization_config",
                "awq_quantization_config"):
        kwargs.pop(key, None)
    return PermutedSparseLoraLinear(target, adapter_name, config=config, **kwargs)


def _with_permllm_dispatch(create_new_module):
    """Wrap `LoraModel._create_new_module` so sparse layers are served first and other errors are clearer."""

    @functools.wraps(create_new_module)
    def create(lora_config, adapter_name, target, **kwargs):
        new_module = dispatch_permllm(target, adapter_name, lora_config, **kwargs)
        if new_module is not None:
            return new_module
        try:
            return create_new_module(lora_config, adapter_name, target, **kwargs)
        except ValueError as error:
            if "is not supported" not in str(error):
                raise
            raise ValueError(
                f"LoRA cannot target a {type(target).__name__}: only linear layers (nn.Linear, PermutedSparseLinear, "
                "...) are supported. Check LoraConfig(target_modules=...): name the linear projections, e.g. "
                "['q_proj', 'v_proj']."
            ) from error

    setattr(create, _MARK, True)
    return create


def register() -> None:
    """Make PEFT's LoRA wrap PermutedSparseLinear layers (idempotent)."""
    current = lora_model.LoraModel.__dict__["_create_new_module"].__func__
    if not getattr(current, _MARK, False):
        lora_model.LoraModel._create_new_module = staticmethod(_with_permllm_dispatch(current))


# Registered by the import, so that an import of this module that itself loads the module the registration changes
# (optimum_permllm/__init__.py runs the registration just after that load) still ends registered.
register()
