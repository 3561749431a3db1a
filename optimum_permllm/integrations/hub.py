"""Hub checkpoints: a model card filled from the model's PermLLMConfig, and a one-commit upload.

`create_model_card` renders `model_cards/permllm_model_card.md` (shipped in the package)
into a `huggingface_hub.ModelCard` with `base_model`, `tags`, `license` and `library_name` metadata.
`push_to_hub` checks the repo id and the token, writes checkpoint + tokenizer + README.md into a temporary
folder and uploads it with `HfApi.create_commit`: one commit, so nothing is ever half-uploaded
(`upload_folder` may split a large folder into several commits when hf_xet is installed).

`model.push_to_hub(repo)` and `model.save_pretrained(dir, push_to_hub=True)` from transformers also upload a
complete sparse checkpoint (packed tensors and the config with its quantization config); they keep the
card already in the repo, so push once with this module to give the repo its card.
"""

from __future__ import annotations

import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, constants, ModelCard, ModelCardData, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..config import PermLLMConfig
from ..sparsifier import sparsity_report

TAGS = ("permllm", "sparse", "pruned", "n:m-sparsity")
RESULT_KEYS = ("perplexity", "zero_shot", "evaluation")
HUB_TIMEOUT_S = 5  # one short try for the base model's licence; the card says "unknown" otherwise
_DEFAULT_CALIBRATION = "the offline Wikipedia text shipped with optimum-permllm (its calibration part)"


def template_path() -> Path:
    """The model card template shipped inside the package."""
    return Path(str(resources.files("optimum_permllm") / "model_cards" / "permllm_model_card.md"))


def create_model_card(model, base_model: str | None = None, results: dict | None = None, *,
                      repo_id: str | None = None, license: str | None = None,
                      base_model_card: str | os.PathLike | None = None,
                      template: str | os.PathLike | None = None) -> ModelCard:
    """The model card of a permllm model, from its quantization config and optional measured results.

    Args:
        model: a sparse model (pruned in memory or loaded from a permllm checkpoint).
        base_model: Hub id of the dense model it was pruned from (default: the config's `_name_or_path`
            when that is a Hub id).
        results: {"perplexity": float | {label: float}, "zero_shot": {task: accuracy} | {label: {task: accuracy}},
            "evaluation": "how it was measured"}; labels such as "dense" and "sparse" become columns.
        repo_id: the repo the card is for (used in the loading example; default: the base model's name + "-permllm").
        license: the licence id; by default read from the base model's card (`base_model_card`, a README.md
            or a folder holding one, else the Hub); "other" with a note when it cannot be read.
        template: another template file; every field it uses must be one this function fills.
    """
    config = _permllm_config(model)
    base_model = _base_model_id(model, base_model)
    license, license_note = _license(base_model, license, base_model_card)
    card_data = ModelCardData(base_model=base_model, tags=_tags(config), library_name="transformers", license=license,
                              pipeline_tag="text-generation")
    fields = _fields(model, config, base_model, results, repo_id, license_note)
    template_text = Path(template).read_text(encoding="utf-8") if template else template_path().read_text(encoding="utf-8")
    _check_template_fields(template_text, set(fields) | set(card_data.to_dict()) | {"card_data"})
    return ModelCard.from_template(card_data, template_str=template_text, **fields)


def push_to_hub(model, tokenizer, repo_id: str, token: str | None = None, private: bool = False,
                commit_message: str | None = None, results: dict | None = None, **card_kwargs: Any):
    """Upload checkpoint + tokenizer + model card to `repo_id` in one commit; returns the CommitInfo.

    Everything that can be checked locally (repo id, token, the model, the card) is checked before a
    file is written or a request is sent. `card_kwargs` go to `create_model_card` (base_model, license, ...).
    """
    check_repo_id(repo_id)
    token = resolve_token(token)
    _check_not_adapter_wrapped(model)
    card = create_model_card(model, results=results, repo_id=repo_id, **card_kwargs)
    config = _permllm_config(model)
    message = commit_message or f"Upload {config.sparsity} sparse model ({config.metric}, permutation={config.permutation})"
    api = HfApi(token=token, library_name="optimum-permllm")
    repo = api.create_repo(repo_id, private=private, exist_ok=True, token=token).repo_id
    with tempfile.TemporaryDirectory(prefix="permllm-push-") as folder:
        model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        card.save(os.path.join(folder, "README.md"))
        return api.create_commit(repo_id=repo, operations=_add_operations(Path(folder)), commit_message=message,
                                 token=token)


def _add_operations(folder: Path) -> list[CommitOperationAdd]:
    """One add operation per file of the folder (sub-folders kept), for a single commit."""
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    return [CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path)) for path in files]


def check_repo_id(repo_id: str) -> None:
    """A clear error for a repo id the Hub would refuse (before anything is written)."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"Invalid Hub repo id {repo_id!r}: {error} Use 'name' or 'namespace/name' with letters, "
                         "digits, '-', '_' and '.'.") from error


def resolve_token(token: str | None) -> str:
    """The given token, else the stored/environment one; a clear error when there is none."""
    token = token or get_token()
    if not token:
        raise ValueError("No Hugging Face token found: log in with `huggingface-cli login` (or `hf auth login`) "
                         "or pass token=... (or set HF_TOKEN).")
    return token


# ------------------------------------------------------------------ card fields
def _permllm_config(model) -> PermLLMConfig:
    """The model's PermLLMConfig, or a clear error when it is not a permllm model."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(config, dict) and config.get("quant_method") == "permllm":
        config = PermLLMConfig.from_dict(config)
    if not isinstance(config, PermLLMConfig):
        raise ValueError("This model has no permllm quantization config: prune it first (PermLLMSparsifier or "
                         "from_pretrained(..., quantization_config=PermLLMConfig(...))) or load a permllm checkpoint.")
    return config


def _base_model_id(model, base_model: str | None) -> str:
    """The base model's Hub id: given, or the config's `_name_or_path` when that is not a local folder."""
    candidate = base_model or getattr(model.config, "_name_or_path", None) or None
    if not candidate or os.path.exists(candidate):
        raise ValueError("Pass base_model='<namespace>/<name>', the Hub id of the dense model this one was pruned "
                         f"from (the model only knows {candidate!r}); it goes into the card's metadata.")
    check_repo_id(candidate)
    return candidate


def _license(base_model: str, license: str | None, base_model_card) -> tuple[str, str]:
    """(licence id, sentence for the card): given, else from the base model's card, else 'other'."""
    if license:
        return license, f"`{license}`, as given when this model was published (the base model is `{base_model}`)."
    found = _base_card_license(base_model, base_model_card)
    if found:
        return found, f"`{found}`, carried over from the base model [{base_model}](https://huggingface.co/{base_model})."
    return "other", (f"Unknown: the licence of the base model `{base_model}` could not be read when this card was "
                     "written. Check the base model's licence before use; it applies to this derived model.")


def _base_card_license(base_model: str, base_model_card) -> str | None:
    """The `license` of the base model's card, from a local README/folder or the Hub; None when unreadable."""
    try:
        if base_model_card is not None:
            path = Path(base_model_card)
            return ModelCard.load(path / "README.md" if path.is_dir() else path).data.license
        if constants.HF_HUB_OFFLINE:
            return None
        card_data = HfApi().model_info(base_model, timeout=HUB_TIMEOUT_S, expand=["cardData"]).card_data
        return None if card_data is None else card_data.license
    except Exception:  # offline, missing card, private repo: the card then says the licence is unknown
        return None


def _tags(config: PermLLMConfig) -> list[str]:
    pattern = config.sparsity.replace(":", "-")
    extra = [f"{pattern}-sparsity", config.metric] + ([f"{config.permutation}-permutation"] if config.permutation != "none" else [])
    return list(TAGS) + extra


def _fields(model, config: PermLLMConfig, base_model: str, results, repo_id, license_note) -> dict[str, str]:
    """Every template field but the metadata, as text."""
    from .. import __version__

    pattern = config.pattern
    name = repo_id or f"{base_model.split('/')[-1]}-permllm-{config.sparsity.replace(':', 'of')}"
    return {
        "model_name": name.split("/")[-1],
        "repo_id": repo_id or name,
        "base_model": base_model,
        "sparsity": config.sparsity,
        "group_size": str(pattern.m),
        "kept_per_group": str(pattern.n),
        "metric": config.metric,
        "permutation_summary": _permutation_summary(config),
        "permutation_details": _permutation_details(config),
        "calibration": _calibration(config),
        "layers": _layers(model),
        "size": _size(model),
        "results": _results_section(results),
        "license_note": license_note,
        "permllm_version": __version__,
    }


def _permutation_summary(config: PermLLMConfig) -> str:
    if config.permutation == "none":
        return "The input channels were not permuted."
    how = "learned (PermLLM)" if config.permutation == "learned" else "chosen by a heuristic (RIA-style)"
    return (f"Before pruning, the input channels of each layer group were permuted ({how}) so that the "
            f"{config.sparsity} groups lose less; the permutation is stored with the weights or folded into the "
            "preceding layer.")


def _permutation_details(config: PermLLMConfig) -> str:
    if config.permutation == "none":
        return "none"
    text = config.permutation
    if config.permutation == "learned":
        layers = "" if config.learned_layers is None else f", learned_layers={config.learned_layers}"
        text += (f" (learner={config.learner}, scope={config.scope}, block_size={config.block_size}, "
                 f"steps={'default' if config.steps is None else config.steps}, lr={config.lr or 'default'}{layers})")
    folding = {"all": "all (attention outputs permuted inside heads)", True: "where exact", False: "none"}
    return text + f"; folded: {folding[config.fold_permutations]}"


def _calibration(config: PermLLMConfig) -> str:
    if not config.needs_calibration:
        return "none (magnitude pruning needs no data)"
    source = _DEFAULT_CALIBRATION if config.dataset is None else f"`{config.dataset}`"
    return f"{source}: {config.num_samples} sequences of {config.seq_len} tokens (seed {config.seed})"


def _layers(model) -> str:
    report = sparsity_report(model)
    permuted = sum(entry["permuted_input"] for entry in report.values())
    patterns = sorted({entry["sparsity"] for entry in report.values()})
    return (f"{len(report)} linear layers ({', '.join(patterns) or 'none'}); {permuted} keep an input permutation, "
            f"{len(report) - permuted} have it folded away or were not permuted; embeddings and lm_head stay dense")


def _size(model) -> str:
    report = sparsity_report(model)
    stored = sum(entry["bytes"] for entry in report.values())
    dense = sum(entry["dense_bytes"] for entry in report.values())
    if not dense:
        return "no sparse layers"
    return f"{stored / 2**20:.1f} MiB instead of {dense / 2**20:.1f} MiB dense ({100 * stored / dense:.0f}%)"


def _results_section(results: dict | None) -> str:
    """Markdown tables for measured perplexity and zero-shot accuracy."""
    if not results:
        return "No evaluation results were recorded when this card was written."
    unknown = sorted(set(results) - set(RESULT_KEYS))
    if unknown:
        raise ValueError(f"Unknown result keys {unknown}: use {list(RESULT_KEYS)}.")
    parts = []
    if results.get("evaluation"):
        parts.append(str(results["evaluation"]))
    if results.get("perplexity") is not None:
        parts.append("Perplexity (lower is better):\n\n" + _table({"perplexity": results["perplexity"]}, "{:.2f}"))
    if results.get("zero_shot"):
        parts.append("Zero-shot accuracy:\n\n" + _table(_by_task(results["zero_shot"]), "{:.4f}"))
    return "\n\n".join(parts)


def _by_task(zero_shot: dict) -> dict[str, Any]:
    """{task: acc} or {label: {task: acc}} as rows keyed by task."""
    if all(isinstance(v, dict) for v in zero_shot.values()):
        tasks = list(dict.fromkeys(task for scores in zero_shot.values() for task in scores))
        return {task: {label: scores.get(task) for label, scores in zero_shot.items()} for task in tasks}
    return zero_shot


def _table(rows: dict[str, Any], number: str) -> str:
    """A markdown table: one row per key; a dict value gives one column per label."""
    labels = list(dict.fromkeys(label for value in rows.values() if isinstance(value, dict) for label in value))
    labels = labels or ["this model"]
    cell = lambda v: "n/a" if v is None else number.format(v)  # noqa: E731
    lines = ["| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for key, value in rows.items():
        values = [value.get(label) for label in labels] if isinstance(value, dict) else [value]
        lines.append(f"| {key} | " + " | ".join(cell(v) for v in values) + " |")
    return "\n".join(lines)


def _check_template_fields(template_text: str, provided: set[str]) -> None:
    """A clear error naming the fields a template uses that nothing fills."""
    import jinja2
    from jinja2 import meta

    needed = meta.find_undeclared_variables(jinja2.Environment().parse(template_text))
    missing = sorted(needed - provided)
    if missing:
        raise ValueError(f"The model card template uses fields that are not filled: {', '.join(missing)}. "
                         f"Available fields: {', '.join(sorted(provided))}.")


def _check_not_adapter_wrapped(model) -> None:
    """Refuse a PEFT-wrapped model: its checkpoint would be an adapter, not a permllm model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(module, BaseTunerLayer) for module in model.modules()):
        raise ValueError("This model still holds LoRA adapters: call model.merge_and_unload() to push a sparse "
                         "checkpoint, or model.save_pretrained()/push_to_hub() on the PeftModel to push the adapter.")
