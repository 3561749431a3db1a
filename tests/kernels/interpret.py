"""Run a Triton launcher on CPU tensors in Triton's interpreter, in a fresh process.

TRITON_INTERPRET is read when a kernel is decorated, so the kernels must be imported by a process
that had it set from the start. Inputs and outputs travel through torch.save files.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import importlib, os, sys, torch
module, name = sys.argv[1].split(":")
launch = getattr(importlib.import_module(module), name)
cases = torch.load(os.environ["CASES"])
torch.save({key: launch(*args) for key, args in cases.items()}, os.environ["OUT"])
"""


def run_interpreted(target: str, cases: dict, tmp_path: Path) -> dict:
    """{case: target(*args)} computed under TRITON_INTERPRET=1; `target` is 'module:function'."""
    pytest.importorskip("triton")
    inputs, out = tmp_path / "cases.pt", tmp_path / "out.pt"
    torch.save(cases, inputs)
    env = dict(os.environ, TRITON_INTERPRET="1", CASES=str(inputs), OUT=str(out), PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", SCRIPT, target], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)
