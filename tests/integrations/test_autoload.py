"""Loading a permllm checkpoint with transformers alone: optimum_permllm-autoload.pth registers permllm.

Each check runs in a fresh interpreter. `site.addsitedir(folder)` processes the .pth files of `folder` as
Python's start does for site-packages; the last test installs the package for real (wheel and editable).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ..conftest import tiny_model
from .test_save_load import _ids, _sparsify_with_random_permutations

ROOT = Path(__file__).resolve().parents[2]
PTH = "optimum_permllm-autoload.pth"
HOOK = "_optimum_permllm_autoload.py"
# The .pth that installs before this one copied into site-packages (it imports the hook and calls install()).
EARLIER_PTH = ('import sys; exec("try:\\n import _optimum_permllm_autoload\\nexcept Exception:\\n pass\\nelse:\\n'
               ' _optimum_permllm_autoload.install()")\n')

LOAD = """
import sys
import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
print(sorted({type(m).__name__ for m in model.modules()}))
"""


def _run(args, timeout=300, **kwargs):
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _site(folder: Path, *files: str) -> Path:
    """A folder holding copies of the given repository files, as site-packages would after an install."""
    folder.mkdir()
    for name in files:
        shutil.copy(ROOT / name, folder / name)
    return folder


def _checkpoint(tmp_path):
    model = _sparsify_with_random_permutations(tiny_model("llama"))
    model.save_pretrained(tmp_path / "checkpoint")
    torch.save(_ids(), tmp_path / "ids.pt")
    return model(_ids()).logits


def _load_args(tmp_path: Path, site: Path | None = None) -> list[str]:
    """`python` arguments that load the checkpoint, after processing the .pth files of `site` if given."""
    script = (f"import site; site.addsitedir({str(site)!r})\n" if site else "") + LOAD
    return ["-c", script, str(tmp_path / "checkpoint"), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")]


def test_checkpoint_loads_with_transformers_alone_and_gives_identical_logits(tmp_path):
    reference = _checkpoint(tmp_path)
    done = _run(_load_args(tmp_path, _site(tmp_path / "site", PTH)))
    assert "PermutedSparseLinear" in done.stdout
    assert torch.equal(torch.load(tmp_path / "logits.pt"), reference)


def test_lora_still_wraps_sparse_layers_when_peft_is_imported_first(tmp_path):
    _checkpoint(tmp_path)
    site = _site(tmp_path / "site", PTH)
    script = (f"import site; site.addsitedir({str(site)!r})\n"
              "import peft\n"  # peft imports transformers' quantizers, so permllm registers during `import peft`
              "from transformers import AutoModelForCausalLM\n"
              f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'checkpoint')!r})\n"
              "model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=['up_proj']))\n"
              "print(type(model.base_model.model.model.layers[0].mlp.up_proj).__name__)\n")
    assert _run(["-c", script]).stdout.split()[-1] == "PermutedSparseLoraLinear"


def test_python_start_imports_nothing_and_adds_one_finder_even_when_the_pth_runs_twice(tmp_path):
    # -S: this interpreter's own site-packages may hold the installed .pth already (pip install -e .). A virtual
    # environment of Python 3.11 processes its site-packages twice, as the second addsitedir does here.
    site = _site(tmp_path / "site", PTH, HOOK)
    script = (f"import site, sys; before = set(sys.modules); site.addsitedir({str(site)!r}); "
              f"site.addsitedir({str(site)!r}, set())\n"
              "print(sorted(set(sys.modules) - before))\n"
              "import json, email.message\n"  # imports other than transformers' registry leave the hook unimported
              "print('_optimum_permllm_autoload' in sys.modules, [type(f).__name__ for f in sys.meta_path])\n")
    lines = _run(["-S", "-c", script], cwd=tmp_path).stdout.splitlines()
    assert lines[0] == "[]"
    assert lines[1].startswith("False ['PermLLMAutoload', ") and lines[1].count("PermLLMAutoload") == 1


def test_the_pth_of_an_earlier_install_still_registers(tmp_path):
    """An editable install keeps the .pth it copied, which calls install(), while the module comes from the tree."""
    reference = _checkpoint(tmp_path)
    site = tmp_path / "site"
    site.mkdir()
    (site / PTH).write_text(EARLIER_PTH)
    done = _run(_load_args(tmp_path, site))
    assert "PermutedSparseLinear" in done.stdout and "Error" not in done.stderr
    assert torch.equal(torch.load(tmp_path / "logits.pt"), reference)


@pytest.mark.parametrize("script", [
    "from optimum_permllm.integrations.transformers import PermLLMHfQuantizer\n"
    "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING\n"
    "print(AUTO_QUANTIZER_MAPPING['permllm'] is PermLLMHfQuantizer)",
    "from optimum_permllm.integrations import peft as permllm_peft\n"
    "from peft.tuners.lora.model import LoraModel\n"
    "print(getattr(LoraModel._create_new_module, permllm_peft._MARK, False))",
], ids=["transformers", "peft"])
def test_importing_an_integration_first_still_registers_it(script, tmp_path):
    # The integration's own import loads the library module that triggers the registration, which imports the
    # integration again while it is half-imported: its import must still end registered.
    # -S: neither .pth hook; PYTHONPATH: this worktree's package and the installed libraries.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *(p for p in sys.path if p)])}
    assert _run(["-S", "-c", script], cwd=tmp_path, env=env).stdout.split()[-1] == "True"


def test_a_stale_pth_without_its_module_is_silent(tmp_path):
    site = _site(tmp_path / "site", PTH)  # the .pth alone: the package was removed by hand
    script = f"import site; site.addsitedir({str(site)!r}); print('started')"
    done = _run(["-S", "-c", script], cwd=tmp_path, env={"PATH": os.environ.get("PATH", "")})
    assert done.stdout.strip() == "started" and done.stderr == ""


def test_a_broken_optimum_permllm_warns_and_leaves_transformers_working(tmp_path):
    site = _site(tmp_path / "site", PTH, HOOK)
    (site / "optimum_permllm").mkdir()
    (site / "optimum_permllm" / "__init__.py").write_text("raise RuntimeError('broken on purpose')\n")
    script = (f"import site; site.addsitedir({str(site)!r})\n"
              "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING\n"
              "print('permllm' in AUTO_QUANTIZER_MAPPING)\n")
    done = _run(["-c", script], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)})
    assert done.stdout.split()[-1] == "False"
    assert "RuntimeWarning" in done.stderr and "broken on purpose" in done.stderr


@pytest.mark.parametrize("editable", [False, True], ids=["wheel", "editable"])
def test_installed_package_loads_checkpoints_without_the_import(editable, tmp_path):
    """pip-install the project into a venv that sees this environment's packages, then load with transformers."""
    reference = _checkpoint(tmp_path)
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                                ".pytest_cache", "runs", ".venv", ".whl"))
    venv = tmp_path / "venv"
    _run(["-m", "venv", "--without-pip", "--system-site-packages", str(venv)])
    python = str(venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    pip = [python, "-m", "pip", "install", "--no-deps", "-q"]  # the build backend comes from the package index
    target = ["-e", str(source)] if editable else [str(source)]
    installed = subprocess.run([*pip, *target], env=env, capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-3000:]
    done = subprocess.run([python, *_load_args(tmp_path)], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), reference)
