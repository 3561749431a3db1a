"""Calibration statistics of a linear layer's input, accumulated in float32.

Wanda and RIA need the per-feature norms ||X_j||_2 over all calibration tokens; SparseGPT needs the
Gram matrix X^T X. Both are plain sums, so batches can arrive in any size and order, and the
statistics of several processes combine with `merge` (or an all-reduce of the three sums).
"""

from __future__ import annotations

import torch


class InputStatistics:
    """Running float32 sums of x_j^2 (and optionally x x^T) over the tokens fed to one layer."""

    def __init__(self, in_features: int, track_gram: bool = False, device: torch.device | str | None = None):
        if in_features <= 0:
            raise ValueError(f"in_features must be positive, got {in_features}.")
        self.in_features = in_features
        self.track_gram = track_gram
        self.sum_squares = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.gram_sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if track_gram else None
        self.num_tokens = 0

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        """Add the tokens of a batch shaped [..., in_features] (any float dtype)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"Batch has {x.shape[-1]} features in its last dimension, the layer has {self.in_features}."
            )
        tokens = x.detach().reshape(-1, self.in_features).to(device=self.sum_squares.device, dtype=torch.float32)
        self.sum_squares += tokens.square().sum(0)
        if self.gram_sum is not None:
            self.gram_sum += tokens.T @ tokens
        self.num_tokens += tokens.shape[0]

    def merge(self, other: InputStatistics) -> InputStatistics:
        """Add another accumulator's sums into this one (for a distributed reduction); returns self."""
        if other.in_features != self.in_features:
            raise ValueError(f"Cannot merge statistics of {other.in_features} features into {self.in_features}.")
        if self.gram_sum is not None and other.gram_sum is None:
            raise ValueError("Cannot merge: this accumulator tracks the Gram matrix but the other does not.")
        self.sum_squares += other.sum_squares.to(self.sum_squares.device)
        if self.gram_sum is not None:
            self.gram_sum += other.gram_sum.to(self.gram_sum.device)
        self.num_tokens += other.num_tokens
        return self

    def feature_norms(self) -> torch.Tensor:
        """||X_j||_2 over all tokens seen, shape [in_features] (the Wanda / RIA activation term)."""
        self._require_tokens()
        return self.sum_squares.sqrt()

    def gram(self) -> torch.Tensor:
        """The mean outer product X^T X / n, shape [in_features, in_features]."""
        return self._gram_total() / self.num_tokens

    def hessian(self) -> torch.Tensor:
        """SparseGPT's layer Hessian H = 2/n X^T X, shape [in_features, in_features]."""
        return self._gram_total() * (2.0 / self.num_tokens)

    def _gram_total(self) -> torch.Tensor:
        """The raw sum X^T X, with clear errors when it is unavailable."""
        if self.gram_sum is None:
            raise RuntimeError("This InputStatistics does not track the Gram matrix: create it with track_gram=True.")
        self._require_tokens()
        return self.gram_sum

    def _require_tokens(self) -> None:
        """Raise when no batch was added yet (the statistics would be 0/0)."""
        if self.num_tokens == 0:
            raise RuntimeError("No calibration tokens were added: call add_batch(x) before reading statistics.")

    def __repr__(self) -> str:
        return f"InputStatistics(in_features={self.in_features}, track_gram={self.track_gram}, num_tokens={self.num_tokens})"
