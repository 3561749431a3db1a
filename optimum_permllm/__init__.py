"""optimum-permllm: N:M (2:4) sparsity with learned channel permutations for Hugging Face LLMs.

Importing the package registers quant_method="permllm" with transformers (and LoRA support with PEFT), so that
`AutoModelForCausalLM.from_pretrained(..., quantization_config=PermLLMConfig(...))` prunes on load and
permllm checkpoints load back as sparse models. The registration happens when transformers imports its
quantizer registry (now, if it has), and PEFT's when PEFT imports its LoRA module: until then nothing heavy is
imported, so the commands' --help answers at once. The public names load torch and transformers on first use.
"""

import importlib

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


def _load_public_api() -> None:
    """Import the public classes and functions into the package namespace."""
    from .config import PermLLMConfig
    from .nn import PermutedSparseLinear
    from .sparsifier import PermLLMSparsifier, sparsity_report

    globals().update(PermLLMConfig=PermLLMConfig, PermLLMSparsifier=PermLLMSparsifier,
                     PermutedSparseLinear=PermutedSparseLinear, sparsity_report=sparsity_report)


def __getattr__(name: str):
    if name in __all__:
        _load_public_api()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register_with(library: str):
    """The callback that imports `integrations/<library>.py`, whose import registers permllm with `library`."""
    return lambda _module: importlib.import_module(f"{__name__}.integrations.{library}")


# The one deliberate side effect: transformers learns quant_method="permllm" and PEFT learns to put LoRA on
# PermutedSparseLinear (PEFT has no registry for that, so its factory is wrapped), each once that library has
# loaded the module that the registration changes (now, if it already has).
when_imported("transformers.quantizers", _register_with("transformers"))
when_imported("peft.tuners.lora.model", _register_with("peft"))
