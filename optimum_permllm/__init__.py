"""optimum-permllm: N:M (2:4) sparsity with learned channel permutations for Hugging Face LLMs.

Importing the package registers quant_method="permllm" with transformers, so that
`AutoModelForCausalLM.from_pretrained(..., quantization_config=PermLLMConfig(...))` prunes on load and
permllm checkpoints load back as sparse models.
"""

from .config import FORMAT_VERSION, PermLLMConfig
from .integrations.transformers import PermLLMHfQuantizer, register as _register
from .nn import PermutedSparseLinear
from .sparsifier import PermLLMSparsifier, sparsity_report

__version__ = "0.1.0"

_register()
from .integrations import peft as _peft_lora  # noqa: E402,F401  (importing it registers LoRA on sparse layers)

__all__ = [
    "FORMAT_VERSION",
    "PermLLMConfig",
    "PermLLMHfQuantizer",
    "PermLLMSparsifier",
    "PermutedSparseLinear",
    "sparsity_report",
]
