"""Check every sparse module of a loaded model against its N:M pattern, before the first forward.

A checkpoint whose permutations are not bijections, whose masks are not N:M, whose pattern is not the
config's, or whose tensors have a dtype the format does not define (integer weights, int16 permutations)
would otherwise load and compute a wrong model. Problems are named "module.tensor: what is wrong".
"""

from __future__ import annotations

import torch
from torch import nn

from ..sparse.validation import nm_mask_problem, non_finite_count, permutation_problem
from .permuted_norm import PermutedOutputNorm
from .permuted_sparse_linear import PermutedSparseLinear

SHOWN_PROBLEMS = 10  # problems listed in an exception message (CheckpointError.problems has them all)


class CheckpointError(ValueError):
    """A permllm checkpoint whose tensors are inconsistent; `problems` lists every one."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        shown = "\n".join(f"  - {p}" for p in self.problems[:SHOWN_PROBLEMS])
        more = f"\n  ... and {len(self.problems) - SHOWN_PROBLEMS} more" if len(self.problems) > SHOWN_PROBLEMS else ""
        where = f" {source}" if source else ""
        super().__init__(
            f"The permllm checkpoint{where} is damaged or inconsistent ({len(self.problems)} problem(s)); it was not "
            f"loaded:\n{shown}{more}\nSave it again from the sparse model, or prune the dense model again. "
            "`permllm info CHECKPOINT` lists every problem."
        )


@torch.no_grad()
def sparse_module_problems(model: nn.Module) -> list[str]:
    """Every problem of the model's PermutedSparseLinear and PermutedOutputNorm tensors ([] when all hold).

    Tensors still on the meta device (offloaded by accelerate) cannot be read here and are skipped."""
    problems = []
    for name, module in model.named_modules():
        if isinstance(module, (PermutedSparseLinear, PermutedOutputNorm)):
            problems += _dtype_problems(name, module)
        if isinstance(module, PermutedSparseLinear):
            problems += _linear_problems(name, module)
        elif isinstance(module, PermutedOutputNorm) and _checkable(module.output_perm):
            problem = permutation_problem(module.output_perm, _norm_width(module))
            if problem:
                problems.append(f"{name}.output_perm {problem}")
    return problems


def check_sparse_modules(model: nn.Module, source: str | None = None) -> None:
    """Raise CheckpointError naming every inconsistent tensor of the model's sparse modules."""
    problems = sparse_module_problems(model)
    if problems:
        raise CheckpointError(problems, source)


def _dtype_problems(name: str, module: nn.Module) -> list[str]:
    """Tensors loaded with a dtype the format does not define: permutations are int64 (another integer type is
    refused, not converted), values, biases and norm weights floating point. transformers keeps a stored integer
    dtype as it is (it casts floating tensors only), so an edited header shows here."""
    problems = []
    perms = [(key, t) for key, t in module.named_buffers() if key.endswith("_perm")]
    for key, tensor in perms:
        if not tensor.is_meta and tensor.dtype != torch.int64:
            problems.append(f"{name}.{key} is stored as {tensor.dtype}; the format stores permutations as torch.int64")
    for key, tensor in module.named_parameters():
        if not tensor.is_meta and not tensor.is_floating_point():
            problems.append(f"{name}.{key} is stored as {tensor.dtype}; packed values, biases and norm weights must "
                            "be floating point (float32, float16 or bfloat16, the model's dtype)")
    return problems


def _checkable(perm: torch.Tensor) -> bool:
    """A permutation whose values can be checked: loaded (not meta) and int64 (_dtype_problems reports others)."""
    return not perm.is_meta and perm.dtype == torch.int64


def _linear_problems(name: str, module: PermutedSparseLinear) -> list[str]:
    problems = []
    if _checkable(module.input_perm):
        problem = permutation_problem(module.input_perm, module.in_features)
        if problem:
            problems.append(f"{name}.input_perm {problem}")
    if not (module.weight_mask.is_meta or module.weight.is_meta):
        problem = nm_mask_problem(module.weight_mask, module.weight, module.in_features, module.n, module.m)
        if problem:
            problems.append(f"{name}.weight_mask {problem}")
        bad = non_finite_count(module.weight)
        if bad:
            problems.append(f"{name}.weight has {bad} NaN or infinite values")
    return problems


def _norm_width(norm: PermutedOutputNorm) -> int:
    """The feature width of a permuted norm: its weight's length (its permutation's own length if it has none)."""
    weight = getattr(norm, "weight", None)
    return weight.shape[0] if isinstance(weight, torch.Tensor) else norm.output_perm.numel()
