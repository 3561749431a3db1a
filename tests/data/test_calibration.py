"""Calibration windows (seeded, contiguous, honest about too little text) and source dispatch."""

import warnings

import datasets
import pytest
import torch

from optimum_permllm.data import calibration
from optimum_permllm.data.calibration import get_calibration_data, get_evaluation_text, sample_windows, tokenize_text
from tests.data.tiny_text import SENTENCES, tiny_tokenizer

TEXT = "\n\n".join(SENTENCES * 4)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _is_contiguous_slice(window, ids):
    """True when `window` equals ids[s : s + len(window)] for some offset s."""
    return bool(ids.unfold(0, len(window), 1).eq(window).all(dim=1).any())


def test_windows_are_seeded_contiguous_slices():
    ids = torch.arange(1000) * 7
    first = sample_windows(ids, num_samples=16, seq_len=32, seed=3)
    assert first.shape == (16, 32) and first.dtype == torch.long
    assert torch.equal(first, sample_windows(ids, 16, 32, seed=3))
    assert not torch.equal(first, sample_windows(ids, 16, 32, seed=4))
    assert torch.equal(first[:, 1:] - first[:, :-1], torch.full((16, 31), 7))  # consecutive tokens
    assert int(first[:, 0].max()) <= (1000 - 32) * 7  # every window fits in the text


def test_last_offset_is_reachable():
    ids = torch.arange(5)
    with pytest.warns(UserWarning, match="overlap"):
        starts = {int(w[0]) for w in sample_windows(ids, 200, 4, seed=0)}
    assert starts == {0, 1}


def test_too_little_text_says_found_and_needed():
    with pytest.raises(ValueError, match=r"has 10 tokens.*seq_len=16"):
        sample_windows(torch.arange(10), num_samples=2, seq_len=16)


def test_overlap_warning_only_when_text_is_short():
    with pytest.warns(UserWarning, match=r"has 100 tokens.*4 windows will overlap"):
        sample_windows(torch.arange(100), num_samples=4, seq_len=30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample_windows(torch.arange(120), num_samples=4, seq_len=30)


def test_list_file_and_dataset_sources_agree(tokenizer, tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(SENTENCES), encoding="utf-8")
    dataset = datasets.Dataset.from_dict({"content": SENTENCES})
    from_list = get_calibration_data(SENTENCES, tokenizer, num_samples=4, seq_len=16, seed=1)
    assert torch.equal(from_list, get_calibration_data(str(path), tokenizer, 4, 16, seed=1))
    assert torch.equal(from_list, get_calibration_data(path, tokenizer, 4, 16, seed=1))
    assert torch.equal(from_list, get_calibration_data(dataset, tokenizer, 4, 16, seed=1, text_column="content"))
    ids = tokenize_text("\n\n".join(SENTENCES), tokenizer)
    assert all(_is_contiguous_slice(window, ids) for window in from_list)


def test_tokenize_text_uses_no_special_tokens(tokenizer):
    ids = tokenize_text(TEXT, tokenizer)
    assert ids.tolist() == tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == TEXT


def test_dataset_without_the_column(tokenizer):
    with pytest.raises(ValueError, match=r"no column 'text'.*text_column="):
        get_calibration_data(datasets.Dataset.from_dict({"body": SENTENCES}), tokenizer, 1, 8)


def test_tokenizer_without_vocabulary_is_rejected():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    empty = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(ValueError, match="usable tokens"):
        get_calibration_data(SENTENCES, empty, 1, 4)


def test_empty_text_and_bad_types(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        get_calibration_data(["", "  "], tokenizer, 1, 4)
    with pytest.raises(TypeError, match="Unsupported calibration source"):
        get_calibration_data(42, tokenizer, 1, 4)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_calibration_data(str(tmp_path / "missing.txt"), tokenizer, 1, 4)


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace datasets.load_dataset by a recorder returning a small text dataset (no network)."""
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_dict({"text": ["first document here", "", "second document here"]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


@pytest.mark.parametrize(
    "name, expected",
    [
        ("wikitext2", (("wikitext", "wikitext-2-raw-v1"), {"split": "train"})),
        ("wikitext-2-raw-v1", (("wikitext", "wikitext-2-raw-v1"), {"split": "train"})),
        ("c4", (("allenai/c4",), {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}, "split": "train"})),
        ("user/corpus", (("user/corpus", None), {"split": "train"})),
        ("user/corpus:clean", (("user/corpus", "clean"), {"split": "train"})),
    ],
)
def test_hub_names_dispatch(fake_hub, name, expected):
    text = calibration.load_calibration_text(name)
    assert fake_hub == [expected]
    assert text == "first document here\n\nsecond document here"


def test_evaluation_wikitext2_is_the_joined_test_split(fake_hub):
    assert get_evaluation_text("wikitext2") == "first document here\n\n\n\nsecond document here"
    assert fake_hub == [(("wikitext", "wikitext-2-raw-v1"), {"split": "test"})]


def test_huge_datasets_are_sampled_by_document(monkeypatch):
    monkeypatch.setattr(calibration, "MAX_JOINED_BYTES", 0)
    rows = [f"document number {i} " * 3 for i in range(50)]
    dataset = datasets.Dataset.from_dict({"text": rows})
    text = calibration.load_calibration_text(dataset, max_chars=200, seed=5)
    picked = text.split("\n\n")
    assert text == calibration.load_calibration_text(dataset, max_chars=200, seed=5)
    assert len(picked) == len(set(picked)) and set(picked) <= set(rows)
    assert sum(map(len, picked[:-1])) < 200 <= sum(map(len, picked))
    assert picked != rows[: len(picked)]  # a random selection, not the first rows


def test_evaluation_text_local_and_unknown(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text("held out text", encoding="utf-8")
    assert get_evaluation_text(path) == "held out text"
    assert get_evaluation_text(["a", "b"]) == "a\n\nb"
    with pytest.raises(ValueError, match="wikitext2"):
        get_evaluation_text("ptb")


def test_default_source_is_the_wikipedia_calibration_part(monkeypatch, tokenizer):
    parts = []
    monkeypatch.setattr(calibration, "wikipedia_split", lambda part: parts.append(part) or TEXT)
    data = get_calibration_data(None, tokenizer, num_samples=2, seq_len=8)
    assert get_evaluation_text() == TEXT and parts == ["calibration", "evaluation"]
    assert torch.equal(data, get_calibration_data("wikipedia", tokenizer, num_samples=2, seq_len=8))
