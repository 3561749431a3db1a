"""Perplexity of a causal LM on a long text, with one fixed and documented protocol.

Protocol (the Wanda / SparseGPT wikitext2 one when `stride` is None):
1. The whole text is tokenized once without special tokens; with `add_bos=True` the BOS token is put
   once in front of the token stream (what a LLaMA tokenizer does on the whole text).
2. Windows of `seq_len` tokens start at 0, stride, 2*stride, ... (stride = seq_len by default, i.e.
   non-overlapping windows); the tail shorter than `seq_len` is dropped; `max_windows` keeps the first ones.
3. The first window scores its `seq_len - 1` next-token predictions; each later window scores only its
   last `stride` tokens, so with a sliding window (stride < seq_len) every token is scored once, with at
   least `seq_len - stride` tokens of context.
4. Perplexity = exp(mean negative log-likelihood over all scored tokens), computed under no_grad in the
   model's own dtype, with the logits upcast to float32 for the log-softmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.calibration import get_evaluation_text, tokenize_text


def _window_starts(num_tokens: int, seq_len: int, stride: int, max_windows: int | None) -> torch.Tensor:
    """Start offsets of the full windows, at most `max_windows` of them."""
    if num_tokens < seq_len:
        raise ValueError(
            f"The text has {num_tokens} tokens, fewer than one window of seq_len={seq_len}: "
            "pass a longer text or a smaller seq_len."
        )
    starts = torch.arange(0, num_tokens - seq_len + 1, stride)
    return starts if max_windows is None else starts[:max_windows]


def _scored_mask(num_windows: int, seq_len: int, stride: int) -> torch.Tensor:
    """[windows, seq_len - 1] bool: which next-token predictions of each window count (see step 3)."""
    mask = torch.zeros(num_windows, seq_len - 1, dtype=torch.bool)
    mask[0] = True
    mask[1:, max(seq_len - 1 - stride, 0) :] = True
    return mask


def _model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (inputs are sent there)."""
    return next(model.parameters()).device


def window_nll(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Float32 negative log-likelihood of every next-token prediction: [batch, seq_len - 1]."""
    logits = model(input_ids=windows, use_cache=False).logits[:, :-1].float()
    targets = windows[:, 1:]
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return nll.view_as(targets)


def token_ids(tokenizer, text: str, add_bos: bool = False) -> torch.Tensor:
    """Token ids of the whole text, optionally with one BOS token in front."""
    ids = tokenize_text(text, tokenizer)
    if not add_bos:
        return ids
    if tokenizer.bos_token_id is None:
        raise ValueError("add_bos=True but the tokenizer has no BOS token: call with add_bos=False.")
    return torch.cat([torch.tensor([tokenizer.bos_token_id]), ids])


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokenizer,
    text: str | None = None,
    seq_len: int = 512,
    stride: int | None = None,
    batch_size: int = 1,
    max_windows: int | None = None,
    device: torch.device | str | None = None,
    add_bos: bool = False,
    progress: bool = False,
) -> float:
    """Perplexity of `model` on `text` (default: the held-out Wikipedia part) by the module's protocol.

    `progress=True` shows a bar over the windows (on stderr).
    """
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len or seq_len < 2 or batch_size < 1:
        raise ValueError(
            "Need seq_len >= 2, 1 <= stride <= seq_len and batch_size >= 1; "
            f"got seq_len={seq_len}, stride={stride}, batch_size={batch_size}."
        )
    windows, scored = _windows(tokenizer, text, seq_len, stride, max_windows, add_bos)
    device = torch.device(device) if device is not None else _model_device(model)
    total = torch.zeros((), dtype=torch.float64)
    with _eval_mode(model):
        batches = tqdm(range(0, len(windows), batch_size), desc="perplexity", unit="batch" if batch_size > 1 else
                       "window", disable=not progress, leave=False)
        for begin in batches:
            nll = window_nll(model, windows[begin : begin + batch_size].to(device))
            total += nll.cpu().double()[scored[begin : begin + batch_size]].sum()
    return math.exp(total.item() / scored.sum().item())


@torch.no_grad()
def kl_divergence(
    model: torch.nn.Module,
    reference: torch.nn.Module,
    tokenizer,
    text: str | None = None,
    seq_len: int = 512,
    max_windows: int | None = None,
    add_bos: bool = False,
) -> float:
    """Mean KL(reference || model) of the next-token distributions over the tokens `perplexity` scores
    (non-overlapping windows): how far a compressed model moved from its dense original, in nats/token."""
    windows, scored = _windows(tokenizer, text, seq_len, seq_len, max_windows, add_bos)
    total = torch.zeros((), dtype=torch.float64)
    with _eval_mode(model), _eval_mode(reference):
        for window, keep in zip(windows, scored):
            logp = _next_token_log_probs(model, window)
            logq = _next_token_log_probs(reference, window)
            kl = (logq.exp() * (logq - logp)).sum(-1)
            total += kl[keep].double().sum()
    return total.item() / scored.sum().item()


def _next_token_log_probs(model: torch.nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Float32 log-probabilities of the next token at every position but the last: [seq_len - 1, vocab]."""
    logits = model(input_ids=window[None].to(_model_device(model)), use_cache=False).logits[0, :-1]
    return F.log_softmax(logits.float(), dim=-1).cpu()


def _windows(tokenizer, text, seq_len, stride, max_windows, add_bos) -> tuple[torch.Tensor, torch.Tensor]:
    """The protocol's token windows [windows, seq_len] and which of their predictions are scored."""
    ids = token_ids(tokenizer, get_evaluation_text() if text is None else text, add_bos)
    starts = _window_starts(ids.numel(), seq_len, stride, max_windows)
    return ids[starts[:, None] + torch.arange(seq_len)], _scored_mask(len(starts), seq_len, stride)


class _eval_mode:
    """Put a model in eval mode and give it back in the mode it had."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)
