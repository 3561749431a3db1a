"""benchmarks/gpu_check.sh --dry-run: every step of the GPU check runs on the CPU at tiny shapes and writes the
files a GPU run brings back, so the script cannot rot between the rare sessions that are lent a GPU."""

import ast
import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
FILES = {"summary.md", "env.txt", "gpu_tests.log", "triton.log", "linear.md", "e2e.md", "layer_time.jsonl",
         "stderr.log"}
STEPS = ["env", "gpu_tests", "triton", "linear", "e2e", "layer_time"]


def _run(*args, timeout=300):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    done = _run("--dry-run", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def _table_rows(text, first_cell):
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row] for row in rows if row[0].strip() == first_cell]


def test_every_step_runs_and_writes_the_files_a_gpu_run_brings_back(dry_run):
    assert {path.name for path in dry_run.iterdir()} == FILES  # the device tool returns at most 8 files
    summary = (dry_run / "summary.md").read_text()
    assert "DRY RUN on the CPU" in summary
    assert [_table_rows(summary, step)[0][1] for step in STEPS] == ["ok"] * len(STEPS)
    env = (dry_run / "env.txt").read_text()
    assert f"torch {torch.__version__}" in env and "nvidia-smi not found (dry run: skipped)" in env


def test_gpu_tests_step_collects_every_gpu_test_file_and_they_skip_without_cuda(dry_run):
    log = (dry_run / "gpu_tests.log").read_text()
    assert re.search(r"\d+ skipped, \d+ deselected", log) and not re.search(r"\d+ (failed|error)", log)
    command = next(line for line in (dry_run / "stderr.log").read_text().splitlines()
                   if line.startswith("===== gpu_tests:"))
    marked = re.compile(r"^ *@pytest\.mark\.gpu|^gpu = pytest\.mark\.gpu", re.MULTILINE)
    files = {path.relative_to(REPO).as_posix() for path in (REPO / "tests").rglob("test_*.py")
             if marked.search(path.read_text()) and "kernels" not in path.parts}
    assert len(files) >= 4 and all(name in command for name in files)
    assert "test_gpu_check.py" not in command
    triton = (dry_run / "triton.log").read_text()
    assert "dry run: not run here" in triton and "tests/kernels/test_permuted_norm.py" in triton


def test_linear_step_times_every_variant_and_prints_a_dispatch_table_to_paste(dry_run):
    text = (dry_run / "linear.md").read_text()
    timing = [row for row in _table_rows(text, "q/k/v/o") if len(row) == 13]
    assert [row[2] for row in timing] == ["1", "16"]
    assert all(float(cell) > 0 for row in timing for cell in row[4:10])
    memory = [row for row in _table_rows(text, "gate/up") if len(row) == 7]
    dense_mib, packed_mib = float(memory[0][3]), float(memory[0][4])
    assert 0.5 * dense_mib < packed_mib < 0.6 * dense_mib  # kept values + bitmask + int64 permutation
    block = text[text.index("MIN_TOKENS_BY_SHAPE = {"):text.index("```", text.index("MIN_TOKENS_BY_SHAPE"))]
    table = ast.literal_eval(block.split("=", 1)[1].split("\nKERNEL_MIN_MACS")[0])
    assert set(table) == {(256, 256), (688, 256), (256, 688)}  # (out_features, in_features) of the quick shapes
    assert set(table.values()) <= {1, 16, None}
    assert re.search(r"^KERNEL_MIN_MACS = [0-9.e+]+$", block, re.MULTILINE)
    assert "CPU stand-in" in text


def test_e2e_step_reports_prefill_decode_per_batch_and_weight_memory(dry_run):
    text = (dry_run / "e2e.md").read_text()
    assert "7 linears at 2:4" in text  # one LLaMA layer
    assert "| model | prefill 32 tok (ms) | decode batch 1 (tok/s) | decode batch 2 (tok/s)" in text
    dense, sparse = _table_rows(text, "dense")[0], _table_rows(text, "2:4")[0]
    assert all(float(cell) > 0 for cell in dense[1:6] + sparse[1:6])
    assert re.search(r"prefill speedup \d+\.\d+x, decode speedup batch 1 \d+\.\d+x, batch 2 \d+\.\d+x", text)


def test_layer_time_step_writes_one_line_per_method(dry_run):
    lines = [json.loads(line) for line in (dry_run / "layer_time.jsonl").read_text().splitlines()]
    assert [line["method"] for line in lines] == ["learned", "gram", "lsq", "joint"]
    assert lines[0]["settings"] == {"permutation": "learned", "learner": "sinkhorn", "steps": 1}
    joint = lines[3]
    assert joint["settings"] == {"permutation": "learned", "scope": "model", "steps": 1}
    assert joint["joint_steps"] == 1 and joint["joint_batch"] == 1
    assert 0 < joint["seconds_per_step"] == joint["seconds_per_step_per_layer"] <= joint["total_seconds_with_capture"]
    for line in lines:
        assert len(line["seconds_per_layer"]) == 1
        assert 0 <= line["seconds_per_layer"][0] <= line["total_seconds_with_capture"] + 0.1  # both rounded


def test_a_step_the_budget_cannot_hold_is_skipped_and_said(tmp_path):
    done = _run("--dry-run", "--out", str(tmp_path), "--budget", "10", "--steps", "env", timeout=60)
    assert done.returncode == 0
    assert _table_rows((tmp_path / "summary.md").read_text(), "env")[0][1] == "skipped: the budget is spent"


@pytest.mark.parametrize("args, message", [
    (["--dry-run", "--steps", "env,nope"], "unknown step 'nope'"),
    (["--frobnicate"], "unknown argument '--frobnicate'"),
    (["--dry-run", "--budget", "ten"], "--budget takes whole seconds"),
    ([], "set OUT or pass --out DIR"),
])
def test_bad_arguments_are_refused_before_anything_runs(args, message, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    done = _run(*args, timeout=30)
    assert done.returncode == 2 and message in done.stderr


def _bench_linear():
    spec = importlib.util.spec_from_file_location("bench_linear", REPO / "benchmarks" / "bench_linear.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_threshold_is_the_first_count_from_which_the_kernel_keeps_winning():
    first_lasting_win = _bench_linear().first_lasting_win
    tokens = [1, 16, 128, 2048]
    assert first_lasting_win(tokens, [1.2, 0.9, 1.1, 1.3]) == 128  # a win at 1 token that does not last
    assert first_lasting_win(tokens, [1.1, 1.1, 1.1, 1.1]) == 1
    assert first_lasting_win(tokens, [0.9, 0.9, 0.9, 1.0]) is None  # equal is not a win
    assert first_lasting_win(tokens, [0.5, 0.8, 1.5, 0.99]) is None  # loses at the largest count


def test_dispatch_lines_are_python_for_cuda_sparse():
    module = _bench_linear()
    shapes = [(4096, 4096, "q/k/v/o"), (4096, 11008, "gate/up"), (11008, 4096, "down")]
    lines = module.dispatch_lines({(4096, 4096): 128, (11008, 4096): None, (4096, 11008): 512}, shapes, 8192)
    code = "\n".join(lines[lines.index("```python") + 1:lines.index("```", lines.index("```python") + 1)])
    namespace = {}
    exec(code, namespace)
    assert namespace["MIN_TOKENS_BY_SHAPE"] == {(4096, 4096): 128, (11008, 4096): None, (4096, 11008): 512}
    # the never-winning shape bounds it: (8192 + 1) x 11008 x 4096 = 369,412,538,368, rounded up to 2 digits
    assert namespace["KERNEL_MIN_MACS"] == 3.7e11
