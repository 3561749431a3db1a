"""Wrap an in-memory (possibly compressed) model for lm-evaluation-harness, e.g. `simple_evaluate`."""

from __future__ import annotations

import torch


def lm_eval_model(model: torch.nn.Module, tokenizer, batch_size: int = 8):
    """An lm-eval `HFLM` around `model` as it is in memory (no reload from disk), on the model's device."""
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as error:
        raise ImportError(
            "lm_eval_model needs lm-evaluation-harness: pip install lm-eval "
            "(or pip install optimum-permllm[eval])."
        ) from error
    device = next(model.parameters()).device
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
