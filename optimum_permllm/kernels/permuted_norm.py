"""A normalisation whose output comes out already permuted: out[..., j] = norm(x)[..., perm[j]].

Fusing the permutation into the norm that precedes q/k/v or gate/up removes the separate gather those
layers would need. Kinds (all statistics in float32):
  "rms"          LLaMA/Qwen2/Mistral: w * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)
  "rms_one_plus" Gemma: ((x * rsqrt(mean(x^2) + eps)) * (1 + w)).to(x.dtype)
  "layer"        OPT's nn.LayerNorm: (x - mean) * rsqrt(var + eps) * w + b
The order of casts follows the Hugging Face modules, so the PyTorch path is bit-exact with them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import use_triton

NORM_KINDS = ("rms", "rms_one_plus", "layer")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def permuted_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, perm: torch.Tensor,
                  eps: float, kind: str = "rms") -> torch.Tensor:
    """norm(x)[..., perm] for a norm over the last dimension; fused Triton kernel on CUDA."""
    _check_arguments(x, weight, bias, perm, kind)
    tensors_ok = all(t is None or t.dtype in TRITON_DTYPES for t in (x, weight, bias))
    if tensors_ok and use_triton(x, weight, bias):
        from .triton_norm import permuted_norm_triton

        return permuted_norm_triton(x, weight, bias, perm, eps, kind)
    return permuted_norm_reference(x, weight, bias, perm, eps, kind)


def permuted_norm_reference(x, weight, bias, perm, eps: float, kind: str = "rms") -> torch.Tensor:
    """The PyTorch definition: the Hugging Face norm, then a column gather (differentiable)."""
    _check_arguments(x, weight, bias, perm, kind)
    return norm_reference(x, weight, bias, eps, kind).index_select(-1, perm.to(x.device))


def norm_reference(x, weight, bias, eps: float, kind: str) -> torch.Tensor:
    """The unpermuted norm, with the same operations in the same order as the Hugging Face modules."""
    if kind == "layer":
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    hidden = x.to(torch.float32)
    normed = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    if kind == "rms":
        normed = normed.to(x.dtype)
        return normed if weight is None else weight * normed
    return (normed * (1.0 + weight.float())).to(x.dtype)


def _check_arguments(x, weight, bias, perm, kind: str) -> None:
    """Reject argument combinations no kind defines, naming what to pass instead."""
    if kind not in NORM_KINDS:
        raise ValueError(f"Unknown norm kind {kind!r}: use one of {NORM_KINDS}.")
    width = x.shape[-1]
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tuple(tensor.shape) != (width,):
            raise ValueError(f"{name} must have shape ({width},) to match x, got {tuple(tensor.shape)}.")
    if kind == "rms_one_plus" and weight is None:
        raise ValueError("kind='rms_one_plus' needs a weight (the norm scales by 1 + weight).")
    if bias is not None and kind != "layer":
        raise ValueError(f"kind={kind!r} has no bias; pass bias=None or use kind='layer'.")
    if perm.dim() != 1:
        raise ValueError(f"perm must be 1-D, got shape {tuple(perm.shape)}.")
