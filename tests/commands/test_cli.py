"""The `permllm` command line on a tiny model: every command, exit codes, atomic outputs, optimum-cli."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from transformers import AutoModelForCausalLM

from optimum_permllm import PermutedSparseLinear
from optimum_permllm.commands import cli
from optimum_permllm.evaluation.perplexity import perplexity
from optimum_permllm.sparse import check_nm

from ..conftest import save_tiny_dense
from ..data.tiny_text import SENTENCES, tiny_tokenizer

COMMANDS = ["prune", "eval", "export-dense", "info", "push"]


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dense")
    save_tiny_dense(folder)
    (folder / "calibration.txt").write_text(" ".join(SENTENCES * 12))
    return folder


@pytest.fixture(scope="module")
def sparse_dir(dense_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("sparse") / "model-2of4"
    status = cli.main(["prune", str(dense_dir), "--output", str(output), "--metric", "wanda", "--permutation", "heuristic",
                       "--dataset", str(dense_dir / "calibration.txt"), "--num-samples", "4", "--seq-len", "32",
                       "--device", "cpu", "--quiet"])
    assert status == 0
    return output


def _ids():
    return tiny_tokenizer()(SENTENCES[2], return_tensors="pt").input_ids


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"permllm {command} " in out


def test_main_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(command in out for command in COMMANDS + ["demo"]) and "permllm COMMAND --help" in out


def test_prune_writes_a_loadable_sparse_checkpoint_and_no_partial_folder(sparse_dir):
    model = AutoModelForCausalLM.from_pretrained(sparse_dir)
    sparse = [m for m in model.modules() if isinstance(m, PermutedSparseLinear)]
    assert len(sparse) == 14 and all(check_nm(m.permuted_dense_weight(), 2, 4) for m in sparse)
    assert model.config.quantization_config.metric == "wanda"
    assert (sparse_dir / "tokenizer.json").is_file()
    assert [p.name for p in sparse_dir.parent.iterdir()] == [sparse_dir.name]


def test_prune_into_an_existing_folder_fails_cleanly(dense_dir, sparse_dir, capsys):
    assert cli.main(["prune", str(dense_dir), "--output", str(sparse_dir), "--metric", "magnitude",
                     "--permutation", "none"]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["prune", "--output", "x"], ["prune", "model", "--gguf-file", "a.gguf", "--output", "x"],
                                  ["prune", "m", "--output", "x", "--metric", "bogus"], ["frobnicate"]])
def test_bad_usage_exits_with_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_invalid_setting_is_one_line_on_stderr_and_exit_1(dense_dir, tmp_path, capsys):
    assert cli.main(["prune", str(dense_dir), "--output", str(tmp_path / "out"), "--sparsity", "3:2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("permllm prune: error:") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_failed_save_leaves_no_folder(dense_dir, tmp_path, monkeypatch):
    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(AutoModelForCausalLM.from_pretrained(dense_dir)), "save_pretrained", broken_save)
    assert cli.main(["prune", str(dense_dir), "--output", str(tmp_path / "out"), "--metric", "magnitude",
                     "--permutation", "none", "--quiet"]) == 1
    assert list(tmp_path.iterdir()) == []


def test_info_lists_layers_patterns_and_sizes(sparse_dir, capsys):
    assert cli.main(["info", str(sparse_dir)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.mlp.down_proj" in out and "2:4" in out and "14 sparse layers" in out
    assert cli.main(["info", str(sparse_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    layer = report["layers"]["model.layers.1.self_attn.q_proj"]
    assert layer["shape"] == [64, 64] and layer["sparsity"] == "2:4" and layer["bytes"] < layer["dense_bytes"]
    assert report["config"]["permutation"] == "heuristic"


def test_info_on_a_dense_model_is_an_error(dense_dir, capsys):
    assert cli.main(["info", str(dense_dir)]) == 1
    assert "not a permllm checkpoint" in capsys.readouterr().err


def test_export_dense_gives_a_plain_model_with_the_same_logits(sparse_dir, tmp_path):
    assert cli.main(["export-dense", str(sparse_dir), "--output", str(tmp_path / "dense")]) == 0
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in config
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert not any(isinstance(m, PermutedSparseLinear) for m in plain.modules())
    sparse = AutoModelForCausalLM.from_pretrained(sparse_dir)
    torch.testing.assert_close(plain(_ids()).logits, sparse(_ids()).logits, rtol=1e-4, atol=1e-5)


def test_eval_writes_perplexity_and_zero_shot_results(sparse_dir, tmp_path, capsys):
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(reversed(SENTENCES)) * 6)
    output = tmp_path / "results.json"
    assert cli.main(["eval", str(sparse_dir), "--text", str(text), "--seq-len", "32", "--tasks", "piqa",
                     "--limit", "3", "--output-json", str(output), "--device", "cpu"]) == 0
    results = json.loads(output.read_text())
    model = AutoModelForCausalLM.from_pretrained(sparse_dir)
    assert results["perplexity"] == pytest.approx(perplexity(model, tiny_tokenizer(), text=text.read_text(), seq_len=32))
    assert set(results["zero_shot"]) == {"piqa", "average"} and 0 <= results["zero_shot"]["piqa"] <= 1
    assert "perplexity:" in capsys.readouterr().out


def test_push_uploads_through_create_commit(sparse_dir, tmp_path, monkeypatch, capsys):
    commits = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **k: type("R", (), {"repo_id": repo_id})())
    monkeypatch.setattr(HfApi, "create_commit", lambda self, repo_id, operations, commit_message, **k:
                        commits.append((repo_id, sorted(op.path_in_repo for op in operations), commit_message)))
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"perplexity": 12.5}))
    assert cli.main(["push", str(sparse_dir), "me/tiny-2of4", "--token", "hf_x", "--base-model", "Qwen/Qwen2-0.5B",
                     "--license", "apache-2.0", "--results", str(results)]) == 0
    (repo, files, message), = commits
    assert repo == "me/tiny-2of4" and {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert message.startswith("Upload 2:4 sparse model")


@pytest.mark.parametrize("repo, token, message", [("bad//repo", "hf_x", "Invalid Hub repo id"),
                                                  ("me/ok", None, "huggingface-cli login")])
def test_push_refuses_bad_repo_or_missing_token(sparse_dir, monkeypatch, capsys, repo, token, message):
    monkeypatch.setattr("optimum_permllm.integrations.hub.get_token", lambda: None)
    monkeypatch.setattr(HfApi, "create_commit", lambda *a, **k: pytest.fail("uploaded"))
    argv = ["push", str(sparse_dir), repo] + (["--token", token] if token else [])
    assert cli.main(argv) == 1
    assert message in capsys.readouterr().err


def test_demo_passes_every_option_to_the_demo(monkeypatch):
    seen = []
    monkeypatch.setattr("optimum_permllm.commands.demo.main", lambda argv=None, prog=None: seen.append((argv, prog)))
    assert cli.main(["demo", "--model", "m", "--permutation", "none", "--help"]) == 0
    assert seen == [(["--model", "m", "--permutation", "none", "--help"], "permllm demo")]


def test_demo_help_names_the_command_typed(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: permllm demo ")


def _imported_top_level_modules(stderr: str) -> set[str]:
    """Top-level package names in the `python -X importtime` report (lines 'import time: self | cumul | name')."""
    names = [line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")]
    return {name.split(".")[0] for name in names}


@pytest.mark.parametrize("argv, usage", [
    (["-m", "optimum_permllm.commands.cli", "--help"], "usage: permllm "),
    *[(["-m", "optimum_permllm.commands.cli", command, "--help"], f"usage: permllm {command} ") for command in COMMANDS + ["demo"]],
    (["-m", "optimum_permllm.demo", "--help"], "usage: python -m optimum_permllm.demo "),
])
def test_help_answers_without_importing_torch_or_transformers(argv, usage):
    done = subprocess.run([sys.executable, "-X", "importtime", *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(usage)
    imported = _imported_top_level_modules(done.stderr)
    assert "argparse" in imported  # the report was read
    assert not imported & {"torch", "transformers", "peft", "accelerate"}


def test_a_plain_import_registers_permllm_at_once():
    script = ("import sys, optimum_permllm; from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING; "
              "print('permllm' in AUTO_QUANTIZER_MAPPING, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "True"]


def test_a_command_run_by_python_m_still_loads_and_registers_after_parsing(sparse_dir):
    done = subprocess.run([sys.executable, "-m", "optimum_permllm.commands.cli", "info", str(sparse_dir)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "14 sparse layers" in done.stdout


@pytest.mark.parametrize("argv, expected", [
    (["permllm", "--help"], ["Make Hugging Face causal LMs N:M", "optimum-cli permllm COMMAND --help"]),
    (["permllm", "info", "--help"], ["usage: optimum-cli permllm info", "--json"]),
])
def test_optimum_cli_finds_the_permllm_command(argv, expected):
    # Run from a checkout other than the installed one (a git worktree beside an editable install), optimum-cli
    # finds register_permllm.py twice, registers it twice and fails with "conflicting subparser: permllm".
    script = f"import sys; from optimum.commands.optimum_cli import main; sys.argv = ['optimum-cli', *{argv!r}]; main()"
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert all(text in done.stdout for text in expected)
    imported = _imported_top_level_modules(done.stderr)
    assert "argparse" in imported  # the report was read
    assert not imported & {"torch", "transformers"}


def test_info_prints_only_its_report(sparse_dir, capsys):
    assert cli.main(["info", str(sparse_dir)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"checkpoint: {sparse_dir}") and "Loading" not in captured.out + captured.err


def test_prune_reads_a_gguf_file_through_the_assets_loader(dense_dir, tmp_path, monkeypatch):
    seen = []

    def load_gguf(path, dtype=None, tokenizer=None):
        seen.append((path, dtype, tokenizer))
        return cli._load_model(str(dense_dir), None, "cpu", None)

    monkeypatch.setattr("optimum_permllm.data.assets.load_gguf", load_gguf)
    assert cli.main(["prune", "--gguf-file", "model.gguf", "--output", str(tmp_path / "out"), "--metric", "magnitude",
                     "--permutation", "none", "--dtype", "float32", "--device", "cpu", "--quiet"]) == 0
    assert seen == [("model.gguf", torch.float32, None)]
    assert (tmp_path / "out" / "config.json").is_file()


def test_prune_from_a_missing_gguf_file_is_one_line_error(tmp_path, capsys):
    assert cli.main(["prune", "--gguf-file", str(tmp_path / "nope.gguf"), "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "nope.gguf not found" in err and err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_info_help_says_that_it_verifies(capsys):
    with pytest.raises(SystemExit):
        cli.main(["info", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "bijections" in out and "exit status is 1" in out


def test_info_reports_every_problem_of_a_corrupted_checkpoint_and_exits_1(sparse_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    for path in sparse_dir.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    tensors = load_file(tmp_path / "model.safetensors")
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"):
        tensors[f"{name}.input_perm"][1] = tensors[f"{name}.input_perm"][0]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert cli.main(["info", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "2 problem(s)" in err
    assert "model.layers.0.mlp.down_proj.input_perm is not a bijection" in err
    assert "model.layers.1.self_attn.o_proj.input_perm is not a bijection" in err


def test_info_on_a_valid_checkpoint_says_what_was_checked(sparse_dir, capsys):
    assert cli.main(["info", str(sparse_dir)]) == 0
    assert "checked: every permutation is a bijection" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["prune", "./missing_folder", "--output", "OUT"], ["eval", "missing_folder"],
                                  ["info", "/no/such/folder"], ["export-dense", "../missing", "--output", "OUT"]])
def test_a_missing_local_folder_is_named_without_trying_the_hub(argv, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was tried")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "no such local folder" in err and argv[1] in err


def test_prune_without_permutation_saves_and_records_damp(dense_dir, tmp_path):
    """Layers of a group get their own input_perm tensor (a shared one made save_pretrained fail)."""
    assert cli.main(["prune", str(dense_dir), "--output", str(tmp_path / "out"), "--metric", "sparsegpt",
                     "--permutation", "none", "--damp", "0.2", "--dataset", str(dense_dir / "calibration.txt"),
                     "--num-samples", "2", "--seq-len", "16", "--quiet"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["damp"] == 0.2
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.config.quantization_config.damp == 0.2


def test_prune_passes_the_learned_settings_and_leaves_the_rest_to_their_defaults(dense_dir, tmp_path):
    """--scope model --learned-layers 1 --steps 0: the joint training's partial variant with no step, which prunes
    exactly as the heuristic; settings not given keep LearningSettings' defaults in the saved config."""
    common = ["--metric", "wanda", "--dataset", str(dense_dir / "calibration.txt"), "--num-samples", "2",
              "--seq-len", "16", "--device", "cpu", "--quiet"]
    assert cli.main(["prune", str(dense_dir), "--output", str(tmp_path / "joint"), "--permutation", "learned",
                     "--scope", "model", "--learned-layers", "1", "--steps", "0", *common]) == 0
    assert cli.main(["prune", str(dense_dir), "--output", str(tmp_path / "cp"), "--permutation", "heuristic",
                     *common]) == 0
    saved = json.loads((tmp_path / "joint" / "config.json").read_text())["quantization_config"]
    assert (saved["scope"], saved["learned_layers"], saved["steps"]) == ("model", 1, 0)
    assert (saved["learner"], saved["block_size"], saved["lr"]) == ("sinkhorn", 64, None)
    joint = AutoModelForCausalLM.from_pretrained(tmp_path / "joint").state_dict()
    heuristic = AutoModelForCausalLM.from_pretrained(tmp_path / "cp").state_dict()
    assert joint.keys() == heuristic.keys() and all(torch.equal(joint[k], heuristic[k]) for k in joint)


def _no_work(monkeypatch):
    """Make loading a model fail loudly: a refusal that comes before any work never reaches it."""
    def started(*args, **kwargs):
        raise AssertionError("the command started its work before refusing the output")

    monkeypatch.setattr(cli, "_load_dense", started)
    monkeypatch.setattr(cli, "_load_model", started)


@pytest.mark.parametrize("command", ["prune", "export-dense"])
@pytest.mark.parametrize("under", ["file/out", "file/deeper/out"])
def test_an_output_under_a_file_is_refused_before_any_work(dense_dir, command, under, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    _no_work(monkeypatch)
    output = tmp_path / under
    assert cli.main([command, str(dense_dir), "--output", str(output)]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'file'} is a file" in err and str(output) in err and "Traceback" not in err
    assert (tmp_path / "file").read_text() == "not a folder"


def test_an_output_in_a_read_only_folder_is_refused_before_any_work(dense_dir, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere: answer for the folder as the OS does for other users
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    _no_work(monkeypatch)
    try:
        assert cli.main(["prune", str(dense_dir), "--output", str(locked / "out")]) == 1
    finally:
        locked.chmod(0o700)
    assert f"no permission to write in {locked}" in capsys.readouterr().err


@pytest.mark.parametrize("under", ["file/results.json", "folder"])
def test_an_eval_results_path_that_cannot_be_written_is_refused_before_any_work(sparse_dir, under, tmp_path, capsys,
                                                                                 monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "folder").mkdir()
    _no_work(monkeypatch)
    assert cli.main(["eval", str(sparse_dir), "--output-json", str(tmp_path / under)]) == 1
    err = capsys.readouterr().err
    assert "--output-json" in err and ("is a file" in err or "is a folder" in err)


@pytest.mark.parametrize("command", ["prune", "eval"])
@pytest.mark.parametrize("device, cuda_devices, message", [
    ("cuda", 0, "device 'cuda' is not available"),
    ("cuda:3", 1, "device 'cuda:3' is not available: this machine has 1 cuda device"),
    ("gpu", 0, "'gpu' is not a device"),
])
def test_an_unavailable_or_unknown_device_is_one_line_error_before_any_work(dense_dir, command, device, cuda_devices,
                                                                           message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_devices > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices)
    _no_work(monkeypatch)
    output = ["--output", str(tmp_path / "out")] if command == "prune" else []
    assert cli.main([command, str(dense_dir), "--device", device, *output]) == 1
    err = capsys.readouterr().err
    assert message in err and "cpu" in err and err.count("\n") == 1


def test_a_checkpoint_moved_aside_by_an_interrupted_save_is_named_when_loading(sparse_dir, tmp_path, capsys):
    """An overwrite killed between its two renames leaves the previous checkpoint in .NAME.old-PID-*."""
    backup = tmp_path / ".model.old-12345-abcd"
    backup.mkdir()
    for path in sparse_dir.iterdir():
        (backup / path.name).write_bytes(path.read_bytes())
    assert cli.main(["info", str(tmp_path / "model")]) == 1
    err = capsys.readouterr().err
    assert f"left the previous checkpoint in {backup}" in err and f"mv {backup} {tmp_path / 'model'}" in err
    assert backup.is_dir() and not (tmp_path / "model").exists()  # loading moves nothing


def test_pruning_a_sparse_checkpoint_says_it_is_already_pruned(sparse_dir, tmp_path, capsys):
    assert cli.main(["prune", str(sparse_dir), "--output", str(tmp_path / "out"), "--metric", "magnitude",
                     "--permutation", "none", "--device", "cpu", "--quiet"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading progress bar
    assert last.startswith("permllm prune: error: This model is already pruned") and "permllm export-dense" in last
    assert not (tmp_path / "out").exists()


def test_an_output_moved_aside_by_an_interrupted_save_is_refused_before_any_work(dense_dir, tmp_path, capsys,
                                                                                 monkeypatch):
    """Without --overwrite the save would put the previous checkpoint back, then refuse: after the whole prune."""
    backup = tmp_path / ".out.old-12345-abcd"
    backup.mkdir()
    (backup / "config.json").write_text("{}")
    _no_work(monkeypatch)
    assert cli.main(["prune", str(dense_dir), "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"moved aside to {backup}" in err and "--overwrite" in err
    assert backup.is_dir() and not (tmp_path / "out").exists()
