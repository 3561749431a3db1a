"""PermLLMConfig: the one object a user fills in, a transformers quantization config (quant_method="permllm")."""

from __future__ import annotations

import copy
import warnings
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .options import FOLDING, LEARNERS, METRICS, PERMUTATIONS, SCOPES  # noqa: F401  (re-exported)
from .algorithms.learned.settings import USER_SETTINGS, user_defaults
from .pipeline.plan import LearningSettings, PruningPlan
from .sparse.nm import NMPattern

#: Version of the checkpoint layout this package writes. Readers refuse newer versions.
FORMAT_VERSION = 1


# Settings read only by the learned permutation, with their defaults (which live in LearningSettings).
_LEARNED_ONLY = user_defaults()


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"PermLLMConfig: {name}={value!r} is not supported; choose one of {list(choices)}.")


def _check_scope(scope: Any, pruned: bool) -> None:
    """The scope must be one of SCOPES; a checkpoint's record of the removed "block" scope is accepted."""
    if scope == "block" and pruned:
        return
    if scope == "block":
        raise ValueError("PermLLMConfig: scope='block' was removed: learned on the decoder layer's output it did not "
                         "beat the heuristic permutation on held-out text (research/FINDINGS.md). Use "
                         "scope='layer' (the default) or 'model'.")
    _check_choice("scope", scope, SCOPES)


def _check_positive_int(name: str, value: Any, allow_none: bool = False, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"PermLLMConfig: {name} must be {kind}, got {value!r}.")


class PermLLMConfig(QuantizationConfigMixin):
    """How to make a model N:M sparse, optionally with channel permutations.

    Args:
        sparsity: the N:M pattern, "2:4" (what GPU sparse tensor cores run), "4:8", "1:4", ...
        metric: which weights to keep: "magnitude" (no data), "wanda", "ria", "gram" (the N:M mask with
            the smallest exact output error on the calibration inputs, weights unchanged), "sparsegpt"
            (also updates the kept weights), or "lsq" (per row, SparseGPT's mask or the Gram-chosen one,
            whichever fits better once the kept weights are refitted by least squares on the calibration
            inputs: the lowest error measured).
        permutation: "none", "heuristic" (RIA-style channel permutation) or "learned" (PermLLM). For
            "lsq" it is chosen on the OBS saliency (the error of pruning a weight when the others are
            refitted), for the other metrics on the metric's score (Wanda's for "sparsegpt" and "gram").
        learner: for permutation="learned": "sinkhorn" (PermLLM) or "ot" (optimal-transport variant).
        scope: for permutation="learned": "layer" (each group of linears sharing an input learns alone, on its
            output error computed from the input Gram matrix) or "model" (PermLLM as published: every group of
            the learned layers learns together, on the last hidden states, then the layer-by-layer pruning runs
            with those permutations; needs the learned layers on the pruning device, a GPU in practice).
            A checkpoint pruned with the removed "block" scope still loads.
        block_size: channels per learnable permutation block (must divide the layer width).
        steps, lr: optimisation budget of the learned permutation (None: the scope's default: 20 steps per
            group for "layer", the paper's 400 AdamW steps of 16 windows for "model"). steps=0 keeps the
            heuristic permutation ("layer": after the exact swap polish).
        learned_layers: the number of last decoder layers that learn their permutations (None: all); the others
            take the heuristic one (the paper's "partial" variant learns the last 6).
        damp: SparseGPT's (and "lsq"'s) dampening, added to the Hessian's diagonal as a fraction of its
            mean; raise it (e.g. 0.1) when SparseGPT reports a Hessian that is not positive definite.
        dataset: calibration text: None (offline Wikipedia default), a Hub dataset name, a local text
            file, or a list of strings.
        tokenizer: a tokenizer or its name/path (defaults to the model's own path when pruning on load).
        num_samples, seq_len, seed: how many calibration sequences of how many tokens, and the sampling seed.
        modules_to_not_convert: modules left dense with every linear under them, a list or one name as a
            string: a full name, a parent ("model.layers.0", "self_attn") or the end of names ("o_proj",
            "mlp.down_proj"); a name that matches no module is an error. lm_head and embeddings are never pruned.
        fold_permutations: True folds input permutations into the layer (or norm) that produces the input
            wherever that is exact, without changing which permutation is chosen; "all" also chooses the
            attention output's heuristic permutation inside heads (shared by GQA query heads) so that it
            folds into v_proj and no layer gathers at run time, at some accuracy cost (research/FINDINGS.md);
            False keeps every permutation as a run-time gather.

    Written by the library when it prunes (saved with the checkpoint): `converted_modules`, the sparse
    linears; `permuted_norms`, each norm that writes its output permuted with the linears that read it
    (a dense export gives the permutation back to them). A checkpoint that records no readers (written
    before they were recorded) has them found with one probe forward at dense export.
    """

    def __init__(
        self,
        sparsity: str = "2:4",
        metric: str = "wanda",
        permutation: str = "heuristic",
        learner: str = _LEARNED_ONLY["learner"],
        scope: str = _LEARNED_ONLY["scope"],
        block_size: int = _LEARNED_ONLY["block_size"],
        steps: int | None = _LEARNED_ONLY["steps"],
        lr: float | None = _LEARNED_ONLY["lr"],
        learned_layers: int | None = _LEARNED_ONLY["learned_layers"],
        damp: float = 0.01,
        dataset: Any = None,
        tokenizer: Any = None,
        num_samples: int = 128,
        seq_len: int = 2048,
        seed: int = 0,
        modules_to_not_convert: list[str] | None = None,
        fold_permutations: bool | str = True,
        format_version: int = FORMAT_VERSION,
        converted_modules: list[str] | None = None,
        permuted_norms: dict[str, list[str]] | list[str] | None = None,
        quant_method: str = "permllm",
        **kwargs,
    ):
        if kwargs:
            where = (" The device is not a setting: prune on it with PermLLMSparsifier(config).sparsify_model(model, "
                     f"tokenizer, device={kwargs['device']!r}), or load the model there." if "device" in kwargs else "")
            raise TypeError(
                f"PermLLMConfig got unknown arguments {sorted(kwargs)}; see help(PermLLMConfig) for the valid ones.{where}"
            )
        self.quant_method = "permllm"
        if quant_method != "permllm":
            raise ValueError(f"PermLLMConfig is for quant_method='permllm', got {quant_method!r}.")
        self.sparsity = sparsity
        self.metric = metric
        self.permutation = permutation
        self.learner = learner
        self.scope = scope
        self.block_size = block_size
        self.steps = steps
        self.lr = lr
        self.learned_layers = learned_layers
        self.damp = damp
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.num_samples = num_samples
        self.seq_len = seq_len
        self.seed = seed
        if isinstance(modules_to_not_convert, str):
            modules_to_not_convert = [modules_to_not_convert]
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert else None
        self.fold_permutations = fold_permutations
        self.format_version = format_version
        self.converted_modules = list(converted_modules) if converted_modules is not None else None
        self.permuted_norms = _norm_record(permuted_norms)
        self.post_init()

    def post_init(self) -> None:
        """Validate every field with an error that names the field and the allowed values."""
        pattern = NMPattern.parse(self.sparsity)
        self.sparsity = str(pattern)
        _check_choice("metric", self.metric, METRICS)
        _check_choice("permutation", self.permutation, PERMUTATIONS)
        _check_choice("learner", self.learner, LEARNERS)
        _check_scope(self.scope, pruned=self.converted_modules is not None)
        _check_choice("fold_permutations", self.fold_permutations, FOLDING)
        _check_positive_int("block_size", self.block_size)
        _check_positive_int("steps", self.steps, allow_none=True, minimum=0)
        _check_positive_int("learned_layers", self.learned_layers, allow_none=True)
        _check_positive_int("num_samples", self.num_samples)
        _check_positive_int("seq_len", self.seq_len)
        if not isinstance(self.seed, int):
            raise ValueError(f"PermLLMConfig: seed must be an integer, got {self.seed!r}.")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"PermLLMConfig: lr must be a positive number, got {self.lr!r}.")
        if not (isinstance(self.damp, (int, float)) and not isinstance(self.damp, bool) and self.damp > 0):
            raise ValueError(f"PermLLMConfig: damp must be a positive number (default 0.01), got {self.damp!r}.")
        if isinstance(self.dataset, str) and not self.dataset.strip():
            raise ValueError("PermLLMConfig: dataset='' names no calibration text; pass None for the offline Wikipedia "
                             "default, a Hub dataset name, a text file, or a list of strings.")
        self._warn_unused_learned_settings()
        if not isinstance(self.format_version, int) or isinstance(self.format_version, bool):
            raise TypeError(f"PermLLMConfig: format_version must be an integer (this package writes "
                            f"{FORMAT_VERSION}), got {self.format_version!r}.")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"This checkpoint was written with permllm format version {self.format_version}, newer than the "
                f"version {FORMAT_VERSION} this optimum-permllm reads. Upgrade: pip install -U optimum-permllm."
            )

    def _warn_unused_learned_settings(self) -> None:
        """Settings of the learned permutation given with another permutation do nothing: say so."""
        unused = {k: getattr(self, k) for k, default in _LEARNED_ONLY.items() if getattr(self, k) != default}
        if unused and self.permutation != "learned":
            settings = ", ".join(f"{k}={v!r}" for k, v in unused.items())
            warnings.warn(f"PermLLMConfig: {settings} only apply to permutation='learned' and are ignored with "
                          f"permutation={self.permutation!r}.", UserWarning, stacklevel=4)

    @property
    def pattern(self) -> NMPattern:
        """The parsed N:M pattern."""
        return NMPattern.parse(self.sparsity)

    @property
    def needs_calibration(self) -> bool:
        """True when pruning needs activations from calibration text (`PruningPlan.needs_calibration`)."""
        return self.to_plan().needs_calibration

    def to_plan(self) -> PruningPlan:
        """The settings the pruning pipeline reads, resolved once into a frozen dataclass."""
        learning = LearningSettings(**{name: getattr(self, name) for name in USER_SETTINGS}, seed=self.seed)
        return PruningPlan(pattern=self.pattern, metric=self.metric, damp=self.damp, permutation=self.permutation,
                           fold_permutations=self.fold_permutations,
                           modules_to_not_convert=tuple(self.modules_to_not_convert or ()), learning=learning)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict: objects (a tokenizer, a dataset) are recorded by name or dropped."""
        output = copy.deepcopy({k: v for k, v in self.__dict__.items() if k not in ("tokenizer", "dataset")})
        output["tokenizer"] = _name_or_none(self.tokenizer)
        output["dataset"] = self.dataset if isinstance(self.dataset, (str, type(None))) else "<in-memory>"
        return output


def _norm_record(value) -> dict[str, list[str]] | None:
    """{permuted norm: the linears that read it}; a list of norm names (written before the readers were
    recorded) gives each norm no readers."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {name: list(readers) for name, readers in value.items()}
    return {name: [] for name in value}


def _name_or_none(tokenizer: Any) -> str | None:
    if tokenizer is None or isinstance(tokenizer, str):
        return tokenizer
    return getattr(tokenizer, "name_or_path", None) or None
