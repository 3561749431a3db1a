"""Offline assets (SmolLM2 model, Wikipedia text) and calibration / evaluation text loaders."""

from .assets import smollm2_gguf_path, smollm2_model_dir, wikipedia_articles, wikipedia_split
from .calibration import get_calibration_data, get_evaluation_text, load_calibration_text

__all__ = [
    "get_calibration_data",
    "get_evaluation_text",
    "load_calibration_text",
    "smollm2_gguf_path",
    "smollm2_model_dir",
    "wikipedia_articles",
    "wikipedia_split",
]
