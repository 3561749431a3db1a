"""The benchmark scripts run in their CPU smoke modes (in this process, on tiny shapes) and print their tables."""

import contextlib
import importlib.util
import io
import json
import re
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def run_script(name, *args):
    """Run benchmarks/NAME's main(args) in this process (no interpreter start-up) and return what it printed."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), REPO / "benchmarks" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()  # the CPU smoke modes set one thread; leave the test process as it was
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            module.main(list(args))
    finally:
        torch.set_num_threads(threads)
    return buffer.getvalue()


def table_rows(text, first_cell):
    """Rows of Markdown tables whose first cell is `first_cell`, split into cells."""
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row] for row in rows if row[0].strip() == first_cell]


def test_bench_linear_cpu_quick():
    out = run_script("bench_linear.py", "--device", "cpu", "--quick", "--tokens", "1", "8")
    assert "| layer | in->out | tokens | dtype | dense (ms)" in out
    timing = [row for row in table_rows(out, "q/k/v/o") if len(row) == 11]
    assert [row[2] for row in timing] == ["1", "8"]
    assert all(float(cell) > 0 for row in timing for cell in row[4:10])
    memory = [row for row in table_rows(out, "gate/up") if len(row) == 6]
    dense_mib, packed_mib = float(memory[0][3]), float(memory[0][4])
    assert 0.5 * dense_mib < packed_mib < 0.6 * dense_mib  # kept values + bitmask + int64 permutation
    assert "Threshold sweep skipped" in out


def test_bench_e2e_cpu_smoke():
    out = run_script("bench_e2e.py", "--device", "cpu", "--layers", "2", "--hidden", "256", "--prefill", "32",
                     "--decode", "2", "--repeats", "1", "--vocab", "512")
    assert "| model | prefill 32 tok (ms) | decode (tok/s)" in out
    assert "14 linears at 2:4" in out  # 7 per LLaMA layer
    dense, sparse = table_rows(out, "dense")[0], table_rows(out, "2:4")[0]
    assert float(dense[1]) > 0 and float(sparse[2]) > 0
    assert float(sparse[3]) < float(dense[3])  # packed weights take less memory
    assert re.search(r"prefill speedup \d+\.\d+x", out)


def test_bench_learned_layer_time_cpu_smoke():
    out = run_script("bench_learned_layer_time.py", "--device", "cpu", "--hidden", "128", "--mlp", "256", "--heads", "2",
                     "--layers", "1", "--num-samples", "2", "--seq-len", "32")
    report = json.loads(out.strip().splitlines()[-1])
    assert report["shape"] == "hidden 128, mlp 256, 2 heads" and len(report["seconds_per_layer"]) == 1
    assert 0 < report["seconds_per_layer"][0] <= report["total_seconds_with_capture"]


def test_bench_pruning_keep_dense_leaves_those_linears_untouched(tmp_path):
    from ..conftest import save_tiny_dense

    save_tiny_dense(tmp_path / "tiny", family="llama")
    common = ["--model", str(tmp_path / "tiny"), "--num-samples", "2", "--seq-len", "32", "--eval-windows", "2",
              "--seed", "3"]
    every_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def row(method, *extra):  # the driver runs each method as `bench_pruning.py --one METHOD` in its own process
        return json.loads(run_script("bench_pruning.py", "--one", method, *common, *extra).strip().splitlines()[-1])

    dense, kept, pruned = row("dense"), row("wanda", "--keep-dense", *every_linear), row("wanda")
    assert kept["keep_dense"] == every_linear and kept["seed"] == 3 and kept["num_samples"] == 2
    assert kept["perplexity"] == dense["perplexity"]  # nothing was pruned
    assert pruned["perplexity"] != dense["perplexity"]


def test_bench_pruning_driver_passes_every_option_but_the_methods_to_each_method_process():
    spec = importlib.util.spec_from_file_location("bench_pruning", REPO / "benchmarks" / "bench_pruning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--methods", "dense", "wanda+cp", "--seed", "3", "--keep-dense", "q_proj", "k_proj", "--jsonl", "x"]
    assert module._forward(argv) == ["--seed", "3", "--keep-dense", "q_proj", "k_proj", "--jsonl", "x"]
