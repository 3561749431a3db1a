"""Which linears read each permuted norm: found by one probe forward, and checked against what a checkpoint records.

A dense export gives each norm's permutation back to the linears recorded as its readers (`permuted_norms`
in the config). A record that names the wrong ones (an edited config, two entries swapped) leaves the sparse
model right but would make the export's logits wrong without a word, so a loaded checkpoint's record is
compared with the linears that read each norm in one forward of 8 tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn.permuted_norm import PermutedOutputNorm
from ..nn.permuted_sparse_linear import PermutedSparseLinear
from ..nn.validation import CheckpointError
from .folding import norm_consumers
from .offload import execution_device

PROBE_TOKENS = 8


@torch.no_grad()
def probe_norm_readers(model: nn.Module) -> dict[str, list[str]]:
    """{norm name: the linears that read its output}, from one forward of PROBE_TOKENS tokens with hooks."""
    device = execution_device([model]) or next(model.parameters()).device
    probe = torch.zeros(1, PROBE_TOKENS, dtype=torch.long, device=device)
    try:
        return norm_consumers(model, lambda: model(input_ids=probe, use_cache=False))
    finally:  # the probe must not leave an unpacked copy of every sparse weight in memory
        for module in model.modules():
            if isinstance(module, PermutedSparseLinear):
                module.free_cache()


def check_norm_readers(model: nn.Module, source: str | None = None) -> None:
    """Raise CheckpointError when a permuted norm's recorded readers are not the linears that read it here.

    A norm that records no readers (a checkpoint written before they were recorded) is given the probe's."""
    norms = {name: m for name, m in model.named_modules() if isinstance(m, PermutedOutputNorm)}
    if not norms:
        return
    found = probe_norm_readers(model)
    modules = dict(model.named_modules())
    problems = []
    for name, norm in norms.items():
        readers = found.get(name, [])
        problems += _reader_problems(name, list(norm.readers), readers, modules)
        if not norm.readers:
            norm.readers = tuple(readers)
    if problems:
        raise CheckpointError(problems, source)


def _reader_problems(name: str, recorded: list[str], readers: list[str], modules: dict[str, nn.Module]) -> list[str]:
    """What is wrong with one norm's record, given the linears that read it in the probe."""
    if not readers:
        return [f"{name}.output_perm: no linear reads this norm's output, so its permutation cannot be given back "
                "at dense export"]
    dense = [r for r in readers if not isinstance(modules.get(r), PermutedSparseLinear)]
    if dense:
        return [f"{name}.output_perm: its output is read by {dense}, which are not sparse layers; a permuted norm's "
                "readers must all be sparse"]
    if recorded and sorted(recorded) != sorted(readers):
        return [f"permuted_norms[{name!r}] records the readers {sorted(recorded)}, but in this model its output is "
                f"read by {sorted(readers)}: the config does not match the model (a dense export would give wrong "
                "logits)"]
    return []
