"""optimum-permllm: N:M (2:4) sparsity with learned channel permutations for Hugging Face LLMs.

Importing the package registers quant_method="permllm" with transformers (and LoRA support with PEFT), so that
`AutoModelForCausalLM.from_pretrained(..., quantization_config=PermLLMConfig(...))` prunes on load and
permllm checkpoints load back as sparse models.
"""

from .config import FORMAT_VERSION, PermLLMConfig
from .integrations.peft import register as _register_peft
from .integrations.transformers import PermLLMHfQuantizer, register as _register_transformers
from .nn import PermutedSparseLinear
from .sparsifier import PermLLMSparsifier, sparsity_report

__version__ = "0.1.0"

# The one deliberate side effect of the import: transformers learns quant_method="permllm" and PEFT
# learns to put LoRA on PermutedSparseLinear (PEFT has no registry for that, so its factory is wrapped).
_register_transformers()
_register_peft()

__all__ = [
    "FORMAT_VERSION",
    "PermLLMConfig",
    "PermLLMHfQuantizer",
    "PermLLMSparsifier",
    "PermutedSparseLinear",
    "sparsity_report",
]
