"""PermLLMSparsifier: the quantizer-style object that converts, prunes, restores and dequantizes models."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .config import PermLLMConfig
from .nn.permuted_norm import PermutedOutputNorm
from .nn.permuted_sparse_linear import PermutedSparseLinear
from .pipeline.layerwise import sparsify_layerwise
from .pipeline.offload import align_hooks, execution_device, on_device
from .pipeline.preflight import check_device, check_finite_weights, warn_block_sizes
from .pipeline.rollback import restored_on_error
from .pipeline.structure import prunable_linears, set_submodule
from .sparse.permutation import compose

logger = logging.getLogger(__name__)


class PermLLMSparsifier:
    """Makes a model N:M sparse as its `PermLLMConfig` says (in the manner of optimum's GPTQQuantizer).

    - `sparsify_model(model, tokenizer)`: prune a model in memory (calibrating when the metric needs it).
    - `convert_model(model, names)`: put empty PermutedSparseLinear modules in place, to load a checkpoint.
    - `dequantize_model(model)`: back to plain nn.Linear (un-permuted, zeros in place).
    """

    def __init__(self, config: PermLLMConfig | None = None, **kwargs: Any):
        if config is not None and kwargs:
            raise TypeError("Pass either a PermLLMConfig or keyword arguments, not both.")
        self.config = config if config is not None else PermLLMConfig(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict) -> PermLLMSparsifier:
        return cls(PermLLMConfig.from_dict(config_dict))

    # ------------------------------------------------------------------ pruning
    def sparsify_model(self, model: nn.Module, tokenizer: Any = None, progress: bool = True, callback=None,
                       device=None) -> nn.Module:
        """Prune `model` in place and record what was converted in its config; returns the model.

        A prune that fails leaves the model exactly as it was: non-finite weights are refused before anything
        changes, and on any later error the replaced modules and tensors are put back before re-raising.

        `device` runs the calibration one decoder layer at a time on that device (e.g. "cuda") while the
        model stays where it is (e.g. on the CPU): models larger than the GPU prune this way.
        `callback(layer_index, info)` is called after each decoder layer.
        """
        config = self.config
        _refuse_sparse(model)
        plan = config.to_plan()
        device = check_device(device) if device is not None else None
        linears = prunable_linears(model, config.modules_to_not_convert)
        check_finite_weights(linears)
        warn_block_sizes(linears, plan)
        with restored_on_error(model):
            samples = self._calibration_samples(model, tokenizer) if plan.needs_calibration else None
            converted = sparsify_layerwise(model, samples, plan, progress=progress, callback=callback, device=device)
        config.converted_modules = sorted(converted)
        config.permuted_norms = _reader_names(model)
        if hasattr(model, "config"):
            model.config.quantization_config = config
        _mark_sparse(model, config)
        return model

    def _calibration_samples(self, model: nn.Module, tokenizer: Any) -> torch.Tensor:
        """The config's calibration text as token ids [num_samples, seq_len], with the given tokenizer, the
        config's, or the model's own (loaded from the model's path)."""
        from .data.calibration import get_calibration_data

        config = self.config
        tokenizer = tokenizer if tokenizer is not None else config.tokenizer
        if tokenizer is None:
            tokenizer = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
        if isinstance(tokenizer, str) and tokenizer:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        if tokenizer is None or isinstance(tokenizer, str):
            raise ValueError(
                f"metric={config.metric!r} / permutation={config.permutation!r} need calibration text and a "
                "tokenizer: pass tokenizer=... to PermLLMConfig or to sparsify_model."
            )
        return get_calibration_data(config.dataset, tokenizer, config.num_samples, config.seq_len, config.seed)

    # ------------------------------------------------------------------ loading
    def convert_model(self, model: nn.Module, module_names: list[str], norm_names: list[str] = ()) -> nn.Module:
        """Replace the named nn.Linear modules by empty PermutedSparseLinear modules of the same shape, and
        wrap the named norms in PermutedOutputNorm (their permutations are filled in by the checkpoint)."""
        pattern = self.config.pattern
        for name in norm_names:
            norm = model.get_submodule(name)
            width = norm.weight.shape[0] if getattr(norm, "weight", None) is not None else None
            if width is None:
                raise ValueError(f"The checkpoint has a permuted norm {name!r}, but that module has no weight vector.")
            readers = (self.config.permuted_norms or {}).get(name, ())
            set_submodule(model, name, PermutedOutputNorm(norm, torch.arange(width), readers=readers))
        for name in module_names:
            try:
                linear = model.get_submodule(name)
            except AttributeError as error:
                raise ValueError(f"The checkpoint has sparse weights for {name!r}, which this model does not have.") from error
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"{name!r} is a {type(linear).__name__}, not an nn.Linear: cannot restore a sparse layer there.")
            sparse = PermutedSparseLinear(linear.in_features, linear.out_features, pattern.n, pattern.m,
                                          bias=linear.bias is not None, device=linear.weight.device,
                                          dtype=linear.weight.dtype)
            set_submodule(model, name, sparse)
        _mark_sparse(model, self.config)
        return model

    # ------------------------------------------------------------------ export
    @staticmethod
    def dequantize_model(model: nn.Module) -> nn.Module:
        """Replace every PermutedSparseLinear by the equivalent dense nn.Linear (zeros in place).

        Permutations folded into norms are first moved back into the linears that read them, so that
        the exported model is a plain one with the original norms. An accelerate-offloaded model stays
        offloaded: each offloaded block is loaded, converted and written back to its CPU store."""
        readers = _norm_readers(model)
        for block in _offloaded_blocks(model):
            with on_device(block, execution_device([block]) or torch.device("cpu")):
                _to_dense(block, readers)
        _to_dense(model, readers)
        return model


def _refuse_sparse(model: nn.Module) -> None:
    """A model that already holds sparse layers is not pruned again: say so, and how to prune it again."""
    layers = sparse_modules(model)
    if layers:
        raise ValueError(
            f"This model is already pruned: it has {len(layers)} sparse layers ({next(iter(layers))}, ...). To "
            "prune it again, load the dense model it was pruned from, or call model.dequantize() first (`permllm "
            "export-dense` on the command line: a plain model with the pruned weights at zero) and prune that."
        )


def _reader_names(model: nn.Module) -> dict[str, list[str]]:
    """{permuted norm: the linears reading it}, as the norms recorded when their permutation was folded."""
    return {name: list(m.readers) for name, m in model.named_modules() if isinstance(m, PermutedOutputNorm)}


def _norm_readers(model: nn.Module) -> dict[int, list[nn.Module]]:
    """The linears reading each PermutedOutputNorm (keyed by id), from what each norm recorded at folding (a
    loaded checkpoint's record is checked, or filled in, at load: pipeline/norm_readers.py).

    Norms that record none (wrapped by hand, without a checkpoint's record) are probed with one forward."""
    norms = [m for m in model.modules() if isinstance(m, PermutedOutputNorm)]
    if not norms:
        return {}
    recorded = _recorded_readers(model, norms)
    if recorded is not None:
        return recorded
    logger.warning("This model's permuted norms do not record which layers read them: finding them with one "
                   "forward pass.")
    from .pipeline.norm_readers import probe_norm_readers

    return {id(model.get_submodule(name)): [model.get_submodule(reader) for reader in names]
            for name, names in probe_norm_readers(model).items() if name}


def _recorded_readers(model: nn.Module, norms: list[PermutedOutputNorm]) -> dict[int, list[nn.Module]] | None:
    """The recorded readers as modules, or None when a norm recorded none or a name is not a sparse linear here."""
    modules = dict(model.named_modules())
    readers = {id(norm): [modules.get(name) for name in norm.readers] for norm in norms}
    if all(found and all(isinstance(m, PermutedSparseLinear) for m in found) for found in readers.values()):
        return readers
    return None


def _offloaded_blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost modules that accelerate offloads and that hold sparse layers or permuted norms."""
    blocks = []
    for module in model.modules():
        inside = any(module in block.modules() for block in blocks)
        holds = any(isinstance(m, (PermutedSparseLinear, PermutedOutputNorm)) for m in module.modules())
        if not inside and holds and any(h.offload for h in align_hooks(module)):
            blocks.append(module)
    return blocks


@torch.no_grad()
def _to_dense(root: nn.Module, readers: dict[int, list[nn.Module]]) -> None:
    """Give each permuted norm of `root` back to its readers and unwrap it, then make its sparse linears dense."""
    for name, norm in [(n, m) for n, m in root.named_modules() if isinstance(m, PermutedOutputNorm)]:
        for layer in readers.get(id(norm), []):
            if layer.input_perm.is_meta:
                raise ValueError("A permuted norm and a linear reading it are offloaded separately, so the norm's "
                                 "permutation cannot be moved back; load the model without device_map to dequantize it.")
            layer.set_input_perm(compose(norm.output_perm, layer.input_perm))
        set_submodule(root, name, norm.unwrap())
    for name, module in [(n, m) for n, m in root.named_modules() if isinstance(m, PermutedSparseLinear)]:
        set_submodule(root, name, module.to_linear())


def _mark_sparse(model: nn.Module, config: PermLLMConfig) -> None:
    """Set what transformers uses to recognise a quantized model (Trainer, dequantize, save_pretrained)."""
    model.is_quantized = True
    model.quantization_method = "permllm"
    if hasattr(model, "config") and not hasattr(model, "hf_quantizer"):
        # imported here, not at the top: importing transformers' quantizer registry runs permllm's registration
        # (optimum_permllm/__init__.py), whose quantizer module imports this one
        from transformers.quantizers.auto import AutoHfQuantizer

        model.hf_quantizer = AutoHfQuantizer.from_config(config, pre_quantized=True)


def sparse_modules(model: nn.Module) -> dict[str, PermutedSparseLinear]:
    """All PermutedSparseLinear modules of a model, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PermutedSparseLinear)}


@torch.no_grad()
def sparsity_report(model: nn.Module) -> dict[str, dict[str, Any]]:
    """What each sparse layer holds: shape, pattern, whether its permutation is folded, bytes stored."""
    report = {}
    for name, module in sparse_modules(model).items():
        stored = sum(t.numel() * t.element_size() for t in (module.weight, module.weight_mask, module.input_perm))
        report[name] = {
            "shape": (module.out_features, module.in_features),
            "sparsity": f"{module.n}:{module.m}",
            "permuted_input": not module.has_identity_perm(),
            "bytes": stored,
            "dense_bytes": module.out_features * module.in_features * module.weight.element_size(),
        }
    return report
