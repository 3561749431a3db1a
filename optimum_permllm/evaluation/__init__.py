"""Evaluation: perplexity on long text, zero-shot multiple-choice accuracy, lm-eval adapter."""

from .lm_eval_adapter import lm_eval_model
from .perplexity import perplexity
from .zeroshot import DEFAULT_TASKS, TASKS, zero_shot

__all__ = ["DEFAULT_TASKS", "TASKS", "lm_eval_model", "perplexity", "zero_shot"]
