"""Every setting of the learned permutation with its default: the one place they live.

`PermLLMConfig` exposes the first group (a user's choices) and builds a `LearningSettings` from them; the
second group is for research and tests. A default that depends on the scope, the learner or the metric is
None below and comes from the tables of this module through `resolved(metric)`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from ...options import LEARNERS, SCOPES

# Optimisation steps: the `layer` scope's per-group search is short; the `model` scope's joint training runs
# the PermLLM paper's budget (AdamW steps of 16 windows: 50 passes over 128 windows).
STEPS = {"layer": 20, "model": 400}
# The per-group search moves each block's most-pushed logit first ("normalized", see optimisation.py); the
# joint training is the paper's AdamW.
OPTIMIZERS = {"layer": "normalized", "model": "adamw"}
# AdamW learning rates of the PermLLM paper: 1e-3 with Wanda scores, 5e-3 with RIA (magnitude as Wanda).
ADAMW_LR = {"magnitude": 1e-3, "wanda": 1e-3, "ria": 5e-3}
# The normalized step moves each block's most-pushed logit by lr * scale per step.
NORMALIZED_LR = 0.02
# Sinkhorn temperature (OT: entropy) annealed linearly from the first value to the second.
TAU = {"sinkhorn": (1.0, 0.1), "ot": (1.0, 0.05)}
# PermLLM normalises 5 times; the OT variant solves an entropic transport problem, so it iterates more.
SINKHORN_ITERS = {"sinkhorn": 5, "ot": 20}
# Logit margin (added to the diagonal) that a block's first change must overcome: the per-group search
# wants a consistent push; the joint training starts as the paper's random blocks do (relabelled so that
# the start is the heuristic permutation).
INIT_BIAS = {"layer": 1.0, "model": 0.0}

# Settings a user sets through PermLLMConfig (the rest are LearningSettings' own).
USER_SETTINGS = ("learner", "scope", "block_size", "steps", "lr", "learned_layers")


@dataclass(frozen=True)
class LearningSettings:
    """How the learned permutation runs (read only with `permutation="learned"`).

    learner: "sinkhorn" (PermLLM: straight-through Hungarian) or "ot" (trains through the soft assignment).
    scope: "layer" (each group of linears sharing an input alone, on its exact output error) or "model"
        (PermLLM as published: every group of the learned layers together, on the last hidden states).
    block_size: channels per learnable block permutation; steps, lr: budget (None: the scope's default).
    learned_layers: the last decoder layers that learn (None: all); the others take the heuristic permutation.
    seed: blocks' random start, row subsets, batch order.
    """

    learner: str = "sinkhorn"
    scope: str = "layer"
    block_size: int = 64
    steps: int | None = None
    lr: float | None = None
    learned_layers: int | None = None
    seed: int = 0
    # --- not in PermLLMConfig ---
    optimizer: str | None = None  # "normalized" or "adamw" (None: the scope's)
    weight_decay: float = 0.1  # AdamW's, on the block logits
    tau: tuple[float, float] | None = None  # temperature from, to (None: the learner's)
    sinkhorn_iters: int | None = None  # (None: the learner's)
    init_bias: float | None = None  # (None: the scope's)
    refine_rounds: int = 5  # `layer` scope: rounds of exact swap search that polish the best permutation
    batch_size: int = 16  # `model` scope: calibration windows per step, over all ranks (the paper's 16)
    micro_batch: int = 16  # `model` scope: windows per forward pass on one rank (lower it to save memory)
    heldout_share: float = 0.125  # `model` scope: share of the windows kept out of training to pick the best
    evaluations: int = 8  # `model` scope: held-out evaluations over a run, after the one of the start
    checkpointing: bool = True  # `model` scope: recompute each decoder layer in the backward pass
    standardise: bool = True  # `model` scope: divide every feature by its dense RMS before the cosine (False: the
    # paper's plain cosine, which the massive residual dimensions decide; it lost to the heuristic: BENCHMARKS.md)

    def __post_init__(self):
        _check_choice("learner", self.learner, LEARNERS)
        _check_choice("scope", self.scope, SCOPES)
        if self.optimizer is not None:
            _check_choice("optimizer", self.optimizer, tuple(set(OPTIMIZERS.values())))
        for name in ("block_size", "batch_size", "micro_batch", "evaluations"):
            _check_positive(name, getattr(self, name))
        if self.learned_layers is not None:
            _check_positive("learned_layers", self.learned_layers)
        for name in ("steps", "refine_rounds"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"LearningSettings: {name} must be an integer >= 0, got {value!r}.")
        if not 0 <= self.heldout_share < 1:
            raise ValueError(f"LearningSettings: heldout_share must be in [0, 1), got {self.heldout_share!r}.")

    def resolved(self, metric: str) -> LearningSettings:
        """These settings with every None filled in for the scope, the learner and `metric` (the score that
        chooses permutations: "magnitude", "wanda" or "ria")."""
        optimizer = self.optimizer or OPTIMIZERS[self.scope]
        lr = self.lr if self.lr is not None else (
            NORMALIZED_LR if optimizer == "normalized" else ADAMW_LR.get(metric, ADAMW_LR["wanda"]))
        return replace(
            self, optimizer=optimizer, lr=lr,
            steps=STEPS[self.scope] if self.steps is None else self.steps,
            tau=TAU[self.learner] if self.tau is None else tuple(self.tau),
            sinkhorn_iters=SINKHORN_ITERS[self.learner] if self.sinkhorn_iters is None else self.sinkhorn_iters,
            init_bias=INIT_BIAS[self.scope] if self.init_bias is None else self.init_bias,
        )

    def user_settings(self) -> dict:
        """The settings PermLLMConfig exposes, by name."""
        return {name: getattr(self, name) for name in USER_SETTINGS}


def user_defaults() -> dict:
    """The defaults of the settings PermLLMConfig exposes."""
    return {f.name: f.default for f in fields(LearningSettings) if f.name in USER_SETTINGS}


def _check_choice(name, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"LearningSettings: {name}={value!r} is not supported; choose one of {list(choices)}.")


def _check_positive(name, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"LearningSettings: {name} must be a positive integer, got {value!r}.")
