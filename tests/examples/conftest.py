"""Fixtures for the example scripts: a tiny dense model folder with the offline tiny tokenizer, and texts."""

import importlib.util
from pathlib import Path

import pytest

from ..conftest import save_tiny_dense
from ..data.tiny_text import SENTENCES

EXAMPLES = Path(__file__).parents[2] / "examples"


def load_example(name: str):
    """Import examples/<name>.py as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_dense(tmp_path_factory):
    """A tiny random Qwen2 and its tokenizer saved as a model folder, plus a training and an evaluation text."""
    folder = tmp_path_factory.mktemp("tiny-dense")
    save_tiny_dense(folder)
    (folder / "train.txt").write_text(" ".join(SENTENCES) * 20)
    (folder / "eval.txt").write_text(" ".join(reversed(SENTENCES)) * 8)
    return folder
