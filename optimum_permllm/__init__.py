"""optimum-permllm: N:M (2:4) sparsity with learned channel permutations for Hugging Face LLMs.

Importing the package registers quant_method="permllm" with transformers (and LoRA support with PEFT), so that
`AutoModelForCausalLM.from_pretrained(..., quantization_config=PermLLMConfig(...))` prunes on load and
permllm checkpoints load back as sparse models.

The commands (`permllm`, `optimum-cli permllm`, `python -m optimum_permllm.<module>`) import the package
too; for them the torch / transformers imports and the registration wait until the command has parsed
its arguments (`load()`), so that `--help` answers at once. Any public name loads them on first use.
"""

import importlib
import sys
from pathlib import Path

try:
    from _optimum_permllm_autoload import when_imported  # standard library only
except ImportError:  # an editable install made before this module existed: `pip install -e .` again

    def when_imported(name, callback):
        callback(importlib.import_module(name))

from .saving import save_pretrained  # standard library only: no torch import

__version__ = "0.1.0"

# What users call; the HfQuantizer is driven by transformers (optimum_permllm.integrations.transformers).
__all__ = [
    "PermLLMConfig",
    "PermLLMSparsifier",
    "PermutedSparseLinear",
    "save_pretrained",
    "sparsity_report",
]

_COMMAND_SCRIPTS = ("permllm", "optimum-cli")


def load() -> None:
    """Import the public API and register permllm with transformers and PEFT (idempotent)."""
    from .config import PermLLMConfig
    from .integrations.transformers import register as register_transformers
    from .nn import PermutedSparseLinear
    from .sparsifier import PermLLMSparsifier, sparsity_report

    globals().update(PermLLMConfig=PermLLMConfig, PermLLMSparsifier=PermLLMSparsifier,
                     PermutedSparseLinear=PermutedSparseLinear, sparsity_report=sparsity_report)
    # The one deliberate side effect: transformers learns quant_method="permllm" and PEFT learns to put
    # LoRA on PermutedSparseLinear (PEFT has no registry for that, so its factory is wrapped). PEFT is not
    # imported for it: its LoRA module is wrapped when something imports it (now, if it already has).
    register_transformers()
    when_imported("peft.tuners.lora.model", _register_peft)


def _register_peft(_lora_model) -> None:
    from .integrations.peft import register

    register()


def __getattr__(name: str):
    if name in __all__:
        load()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _started_by_a_command() -> bool:
    """True while one of the package's commands starts up: it calls load() itself after parsing."""
    script = sys.argv[0] if sys.argv else ""
    if script == "-m":  # python -m <module> is importing the module's packages: which module?
        args = sys.orig_argv
        return "-m" in args[:-1] and args[args.index("-m") + 1].startswith(f"{__name__}.")
    return Path(script).stem in _COMMAND_SCRIPTS  # stem: permllm.exe on Windows


if not _started_by_a_command():
    load()
