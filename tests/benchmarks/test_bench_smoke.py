"""The pruning benchmark runs in its CPU smoke mode (in this process, on tiny shapes); the GPU benchmarks run in
benchmarks/gpu_check.sh's dry run (test_gpu_check.py)."""

import contextlib
import importlib.util
import io
import json
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


def test_bench_pruning_joint_rows_record_the_training_and_zero_steps_give_the_heuristic(tmp_path):
    from ..conftest import save_tiny_dense

    save_tiny_dense(tmp_path / "tiny", family="llama")
    common = ["--model", str(tmp_path / "tiny"), "--num-samples", "3", "--seq-len", "32", "--eval-windows", "2"]

    def row(method, *extra):
        return json.loads(run_script("bench_pruning.py", "--one", method, *common, *extra).strip().splitlines()[-1])

    joint = row("wanda+learned-model", "--learned-layers", "1", "--steps", "2", "--joint-batch", "2")
    assert (joint["learned_layers"], joint["joint_batch"]) == (1, 2)
    info = joint["joint"]
    assert (info["first_layer"], info["steps"], info["train_windows"], info["heldout_windows"]) == (1, 2, 2, 1)
    assert len(info["heldout_history"]) == 3 and info["start_loss"] == round(info["heldout_history"][0], 6)
    assert info["seconds_per_step"] > 0
    unlearned = row("wanda+learned-model", "--learned-layers", "1", "--steps", "0")
    assert unlearned["joint"]["best_step"] == 0
    assert unlearned["perplexity"] == row("wanda+cp")["perplexity"]
