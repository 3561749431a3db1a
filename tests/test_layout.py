"""The repository root as Python sees it when a command runs from a clone: nothing there may hide an
installed dependency, and a real model builds from there (the crash of transformers 5.25 importing the
root's `kernels/` folder instead of Hugging Face's `kernels` package)."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
OWN = {"optimum_permllm", "_optimum_permllm_autoload", "optimum"}  # optimum: the namespace plugin folder


def _root_entries() -> dict[str, Path]:
    """Importable name -> path for every folder or .py module at the repository root."""
    entries = {}
    for path in ROOT.iterdir():
        if path.name.startswith(".") or path.name in {"tests", "build", "dist"}:
            continue
        if path.suffix == ".py":
            entries[path.stem] = path
        elif path.is_dir() and path.name.isidentifier():
            entries[path.name] = path
    return entries


def _shadowing(entries: dict[str, Path], installed: dict[str, list[str]]) -> list[str]:
    """Root entries that Python would import instead of an installed distribution's module of that name."""
    hidden = []
    for name, path in sorted(entries.items()):
        owners = [d for d in installed.get(name, []) if d.lower().replace("_", "-") != "optimum-permllm"]
        importable = path.suffix == ".py" or (path / "__init__.py").exists()
        if owners and importable and name not in OWN:
            hidden.append(f"{path.name} hides `{name}` of {', '.join(sorted(set(owners)))}")
    return hidden


def test_no_root_folder_or_module_hides_an_installed_module():
    assert _shadowing(_root_entries(), importlib.metadata.packages_distributions()) == []


def test_the_check_sees_a_package_and_a_module_but_not_a_plain_folder(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "docs").mkdir()
    entries = {"kernels": tmp_path / "kernels", "six": tmp_path / "six.py", "docs": tmp_path / "docs"}
    installed = {"kernels": ["kernels"], "six": ["six"], "docs": ["docs-dist"]}
    assert _shadowing(entries, installed) == ["kernels hides `kernels` of kernels", "six.py hides `six` of six"]


def test_every_installed_top_level_module_imports_from_site_packages_when_run_from_the_root():
    """What Python resolves from the root, checked in a fresh interpreter started there."""
    names = sorted(set(_root_entries()) & set(importlib.metadata.packages_distributions()) - OWN)
    code = ("import importlib.util, sys\n"
            f"for n in {names!r}:\n"
            "    s = importlib.util.find_spec(n)\n"
            "    locs = list(s.submodule_search_locations or []) + [s.origin or '']\n"
            f"    bad = [l for l in locs if l and l.startswith({str(ROOT) + os.sep!r})]\n"
            "    print(n, 'FROM-ROOT' if bad else 'ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "FROM-ROOT" not in out.stdout, out.stdout


def test_a_transformers_model_builds_from_the_repository_root():
    code = ("import torch\nfrom transformers import AutoModelForCausalLM, LlamaConfig\n"
            "c = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,"
            " num_key_value_heads=1, vocab_size=64)\n"
            "m = AutoModelForCausalLM.from_config(c)\n"
            "print(tuple(m(torch.tensor([[1, 2, 3]])).logits.shape))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "(1, 3, 64)" in out.stdout, out.stderr[-2000:]


def test_the_real_smollm2_converts_and_loads_from_the_repository_root():
    """The demo's first step as a fresh clone runs it: the GGUF conversion (which builds a model) and a load."""
    code = ("import torch\nfrom transformers import AutoModelForCausalLM\n"
            "from optimum_permllm.data import smollm2_model_dir\n"
            "m = AutoModelForCausalLM.from_pretrained(smollm2_model_dir(), dtype=torch.float32)\n"
            "print(type(m).__name__, m.config.num_hidden_layers)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "LlamaForCausalLM 30" in out.stdout, out.stderr[-2000:]
