"""Offline assets (SmolLM2 and Gemma 3 models, Wikipedia text) and calibration / evaluation text loaders."""

from .assets import (gemma3_model_dir, resolve_model, smollm2_gguf_path, smollm2_model_dir, wikipedia_articles,
                     wikipedia_split)
from .calibration import get_calibration_data, get_evaluation_text, load_calibration_text

__all__ = [
    "gemma3_model_dir",
    "get_calibration_data",
    "get_evaluation_text",
    "load_calibration_text",
    "resolve_model",
    "smollm2_gguf_path",
    "smollm2_model_dir",
    "wikipedia_articles",
    "wikipedia_split",
]
