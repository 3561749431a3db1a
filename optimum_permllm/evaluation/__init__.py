"""Evaluation: perplexity on long text, zero-shot multiple-choice accuracy, lm-eval adapter."""

from .lm_eval_adapter import lm_eval_model
from .perplexity import kl_divergence, perplexity
from .zeroshot import DEFAULT_TASKS, TASKS, zero_shot

__all__ = ["DEFAULT_TASKS", "TASKS", "kl_divergence", "lm_eval_model", "perplexity", "zero_shot"]
