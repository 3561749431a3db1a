"""Calibration token windows and evaluation text, offline by default, Hub datasets when online.

Sampling follows GPTQ / Wanda: the whole text is concatenated and tokenized once (no special tokens),
then `num_samples` windows of `seq_len` consecutive tokens start at offsets drawn uniformly with a
`torch.Generator` seeded by `seed`, so the same call always returns the same tensor.

Sources (`source=`):
- None or "wikipedia": the calibration part of the offline Wikipedia text (`assets.wikipedia_split`);
- a path to a local text file; a list of strings (joined by a blank line);
- a `datasets.Dataset` (column `text_column`);
- a Hub dataset name: "wikitext2" / "wikitext-2-raw-v1" (wikitext, train split), "c4" (the first
  allenai/c4 English shard, documents taken in a seeded random order, as GPTQ does), or any other
  "name" / "name:config" whose train split has a `text_column` column.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

from .assets import wikipedia_split

WIKITEXT2_NAMES = ("wikitext2", "wikitext-2", "wikitext-2-raw-v1", "wikitext")
C4_NAMES = ("c4", "allenai/c4")
C4_TRAIN_SHARD = "en/c4-train.00000-of-01024.json.gz"
# A dataset larger than this (Arrow bytes) is sampled by document instead of joined whole (C4 shards).
MAX_JOINED_BYTES = 64 * 2**20
# When sampling documents, collect about this many characters per calibration token needed.
CHARS_PER_TOKEN_BUDGET = 8

def _read_file(path: str | os.PathLike) -> str:
    """Text of a local file, with a clear error when it does not exist."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Text file {path} does not exist: pass an existing file, a list of strings or a dataset name."
        )
    return path.read_text(encoding="utf-8")


def _looks_like_path(source: str | os.PathLike) -> bool:
    """A PathLike, an existing file, or a string with a text-file suffix is read as a local file."""
    return not isinstance(source, str) or Path(source).is_file() or source.endswith((".txt", ".md", ".text"))


def _join_dataset(dataset, text_column: str, max_chars: int | None, seed: int) -> str:
    """Rows of a dataset joined by a blank line; huge datasets are sampled by document up to max_chars."""
    if text_column not in dataset.column_names:
        raise ValueError(
            f"The dataset has no column {text_column!r} (columns: {dataset.column_names}): "
            "pass text_column= with the column that holds the text."
        )
    if max_chars is None or dataset.data.nbytes <= MAX_JOINED_BYTES:
        return "\n\n".join(row for row in dataset[text_column] if row)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    rows, total = [], 0
    for index in order:
        row = dataset[index][text_column]
        rows.append(row)
        total += len(row)
        if total >= max_chars:
            break
    return "\n\n".join(rows)


def _hub_dataset(name: str, split: str):
    """Load a Hub dataset split; wikitext2 and c4 are mapped to their standard configurations."""
    import datasets

    key = name.lower()
    if key in WIKITEXT2_NAMES:
        return datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    if key in C4_NAMES:
        if split != "train":
            raise ValueError("Only the C4 train shard is used here (for calibration); evaluate on wikitext2.")
        return datasets.load_dataset("allenai/c4", data_files={"train": C4_TRAIN_SHARD}, split="train")
    path, _, config = name.partition(":")
    return datasets.load_dataset(path, config or None, split=split)


def _is_hf_dataset(source) -> bool:
    """True for a datasets.Dataset (whose owner has imported datasets: text and files need no datasets)."""
    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(source, datasets.Dataset)


def load_calibration_text(
    source=None, text_column: str = "text", max_chars: int | None = None, seed: int = 0
) -> str:
    """The calibration text of any supported source (see the module docstring) as one string."""
    if source is None or (isinstance(source, str) and source.lower() == "wikipedia"):
        return wikipedia_split("calibration")
    if _is_hf_dataset(source):
        return _join_dataset(source, text_column, max_chars, seed)
    if isinstance(source, (list, tuple)):
        if not all(isinstance(item, str) for item in source):
            raise TypeError("A list source must hold strings (one document each).")
        return "\n\n".join(source)
    if isinstance(source, (str, os.PathLike)):
        if _looks_like_path(source):
            return _read_file(source)
        return _join_dataset(_hub_dataset(source, "train"), text_column, max_chars, seed)
    raise TypeError(
        f"Unsupported calibration source of type {type(source).__name__}: pass None or 'wikipedia', a text "
        "file path, a list of strings, a datasets.Dataset, or a Hub dataset name such as 'wikitext2' or 'c4'."
    )


def tokenize_text(text: str, tokenizer) -> torch.Tensor:
    """Token ids of the whole text (no special tokens) as a 1-D LongTensor; errors on unusable tokenizers."""
    if not text.strip():
        raise ValueError("The text is empty: pass a source with some text.")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)
    if len(ids) == 0 or (unk is not None and all(i == unk for i in ids)):
        raise ValueError(
            f"The tokenizer turned {len(text)} characters into {len(ids)} usable tokens "
            "(none, or only the unknown token): check that it has a vocabulary matching the text "
            "(load it with AutoTokenizer.from_pretrained of the model you compress)."
        )
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(ids: torch.Tensor, num_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """`num_samples` windows of `seq_len` tokens at seeded uniform random offsets: [num_samples, seq_len]."""
    if num_samples < 1 or seq_len < 1:
        raise ValueError(f"num_samples and seq_len must be positive, got {num_samples} and {seq_len}.")
    num_tokens = ids.numel()
    if num_tokens < seq_len:
        raise ValueError(
            f"The calibration text has {num_tokens} tokens but one window needs seq_len={seq_len}: "
            "pass more text or a smaller seq_len."
        )
    if num_tokens < num_samples * seq_len:
        warnings.warn(
            f"The calibration text has {num_tokens} tokens, fewer than num_samples * seq_len = "
            f"{num_samples * seq_len}: the {num_samples} windows will overlap. Pass more text for "
            "independent samples.",
            stacklevel=3,
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, num_tokens - seq_len + 1, (num_samples,), generator=generator)
    return ids[starts[:, None] + torch.arange(seq_len)]


def get_calibration_data(
    source,
    tokenizer,
    num_samples: int = 128,
    seq_len: int = 2048,
    seed: int = 0,
    text_column: str = "text",
) -> torch.LongTensor:
    """Deterministic GPTQ/Wanda-style calibration batch `[num_samples, seq_len]` of token ids."""
    max_chars = CHARS_PER_TOKEN_BUDGET * num_samples * seq_len
    text = load_calibration_text(source, text_column=text_column, max_chars=max_chars, seed=seed)
    return sample_windows(tokenize_text(text, tokenizer), num_samples, seq_len, seed)


def get_evaluation_text(source=None) -> str:
    """Held-out evaluation text: the Wikipedia evaluation part, a local file, or the wikitext2 test split."""
    if source is None or (isinstance(source, str) and source.lower() == "wikipedia"):
        return wikipedia_split("evaluation")
    if isinstance(source, (list, tuple)):
        return "\n\n".join(source)
    if isinstance(source, str) and source.lower() in WIKITEXT2_NAMES:
        return "\n\n".join(_hub_dataset(source, "test")["text"])
    if isinstance(source, (str, os.PathLike)) and _looks_like_path(source):
        return _read_file(source)
    raise ValueError(
        f"Unknown evaluation text {source!r}: pass None or 'wikipedia' (offline), 'wikitext2' "
        "(Hub, test split), a path to a text file, or a list of strings."
    )
