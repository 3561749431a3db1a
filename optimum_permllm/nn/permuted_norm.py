"""PermutedOutputNorm: a model's norm that emits its output in the next layers' permuted column order.

Wrapping the norm in front of q/k/v (or gate/up, or OPT's fc1) folds their shared input permutation
into the norm, so those layers can skip their own gather. Known norm classes run the fused kernel of
`optimum_permllm.kernels.permuted_norm`; any other norm is run as is and its output gathered.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from ..kernels.permuted_norm import permuted_norm
from ..sparse.permutation import check_permutation

# Hugging Face classes whose forward is LLaMA's: w * (x * rsqrt(mean(x^2) + eps)).to(x.dtype).
LLAMA_STYLE_RMS_NORMS = frozenset({
    "LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen2MoeRMSNorm",
    "Qwen3RMSNorm", "Qwen3MoeRMSNorm", "Phi3RMSNorm", "GraniteRMSNorm",
})
# Hugging Face classes whose forward is Gemma's: (x * rsqrt(mean(x^2) + eps) * (1 + w)).to(x.dtype).
GEMMA_STYLE_RMS_NORMS = frozenset({"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"})


def norm_kind(norm: nn.Module) -> str | None:
    """The fused-kernel kind ("rms", "rms_one_plus", "layer") of a norm module, or None if unknown."""
    cls = type(norm)
    if cls is nn.LayerNorm:
        return "layer" if len(norm.normalized_shape) == 1 else None
    if not cls.__module__.startswith("transformers.") or _eps(norm) is None:
        return None
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    if cls.__name__ in LLAMA_STYLE_RMS_NORMS:
        return "rms"
    if cls.__name__ in GEMMA_STYLE_RMS_NORMS:
        return "rms_one_plus"
    return None


def _eps(norm: nn.Module) -> float | None:
    """The epsilon of a norm, stored as `variance_epsilon` (LLaMA) or `eps` (Gemma, nn.LayerNorm)."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return float(eps) if isinstance(eps, (int, float)) else None


class PermutedOutputNorm(nn.Module):
    """y = norm(x)[..., output_perm], fused into one kernel for LLaMA/Gemma RMSNorm and nn.LayerNorm.

    State dict keys are the wrapped norm's own (`weight`, and `bias` for a LayerNorm; any other
    parameters, buffers and submodules of an unknown norm under their original names) plus the buffer
    `output_perm` (int64 [hidden]). A checkpoint of the wrapped model therefore keeps
    `...input_layernorm.weight` where the dense model had it, and adds `...input_layernorm.output_perm`.

    `readers` are the qualified names (in the model) of the linears that read the output, recorded when
    the permutation is folded so that a dense export can give it back to them; a checkpoint keeps them in
    its quantization config (`permuted_norms`).
    """

    def __init__(self, norm: nn.Module, output_perm: torch.Tensor, readers: tuple[str, ...] = ()):
        super().__init__()
        self.readers = tuple(readers)
        self.kind = norm_kind(norm)
        self.eps = _eps(norm)
        object.__setattr__(self, "_norm", norm)  # hidden: its tensors are registered on self below
        for name, param in norm.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buffer in norm.named_buffers(recurse=False):
            self.register_buffer(name, buffer, persistent=name not in norm._non_persistent_buffers_set)
        for name, child in norm.named_children():
            self.add_module(name, child)
        self.register_buffer("output_perm", output_perm.detach().long().clone())
        check_permutation(self.output_perm, self.output_perm.numel())

    @property
    def norm(self) -> nn.Module:
        """The wrapped norm module (sharing this module's parameters)."""
        return self._norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind is None:
            return self._run_norm(x).index_select(-1, self.output_perm)
        bias = getattr(self, "bias", None) if self.kind == "layer" else None
        return permuted_norm(x, getattr(self, "weight", None), bias, self.output_perm, self.eps, self.kind)

    def _run_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped norm's forward, reading this module's current tensors (they may have been replaced)."""
        tensors = dict(self.named_parameters())
        tensors.update((name, buf) for name, buf in self.named_buffers() if name != "output_perm")
        return functional_call(self._norm, tensors, (x,))

    def unwrap(self) -> nn.Module:
        """The plain norm with this module's current tensors, for a dense export."""
        self._norm.load_state_dict(
            {k: v for k, v in self.state_dict(keep_vars=True).items() if k != "output_perm"}, assign=True)
        return self._norm

    def extra_repr(self) -> str:
        return f"{type(self._norm).__name__}, kind={self.kind or 'unfused'}, features={self.output_perm.numel()}"
