"""Every example script runs end to end on a tiny model (the real-model runs are marked slow)."""

import json

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from transformers import AutoModelForCausalLM

from optimum_permllm import PermutedSparseLinear
from optimum_permllm.commands import demo
from optimum_permllm.sparse import check_nm

from .conftest import load_example


@pytest.fixture(scope="module")
def pruned(tiny_dense, tmp_path_factory):
    """A sparse checkpoint written by the demo (examples/ holds no second prune-and-evaluate script)."""
    output = tmp_path_factory.mktemp("pruned") / "model"
    report = demo.main(["--model", str(tiny_dense), "--metric", "wanda", "--permutation", "heuristic",
                        "--dataset", str(tiny_dense / "train.txt"), "--num-samples", "4", "--seq-len", "32",
                        "--eval-windows", "1", "--output", str(output), "--device", "cpu"])
    return output, report


def test_inference_generates_from_the_checkpoint(pruned, capsys):
    text = load_example("inference").main([str(pruned[0]), "--prompt", "The quick", "--max-new-tokens", "5",
                                           "--device", "cpu"])
    assert text.startswith("The quick") and "14 sparse layers (2:4)" in capsys.readouterr().out


def test_finetune_lora_trains_merges_and_saves_a_sparse_checkpoint(tiny_dense, pruned, tmp_path):
    report = load_example("finetune_lora").main([
        "--model", str(pruned[0]), "--train-text", str(tiny_dense / "train.txt"), "--eval-text",
        str(tiny_dense / "eval.txt"), "--steps", "12", "--batch-size", "2", "--seq-len", "32", "--lr", "3e-3",
        "--rank", "4", "--log-every", "6", "--output", str(tmp_path / "merged"), "--device", "cpu"])
    assert report["last_loss"] < report["first_loss"]
    assert report["lora_perplexity"] < report["sparse_perplexity"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    sparse = [m for m in merged.modules() if isinstance(m, PermutedSparseLinear)]
    assert len(sparse) == 14 and all(check_nm(m.permuted_dense_weight(), 2, 4) for m in sparse)


def test_finetune_lora_prunes_a_dense_model_on_load(tiny_dense):
    report = load_example("finetune_lora").main([
        "--model", str(tiny_dense), "--metric", "magnitude", "--permutation", "none", "--train-text",
        str(tiny_dense / "train.txt"), "--eval-text", str(tiny_dense / "eval.txt"), "--steps", "2",
        "--batch-size", "1", "--seq-len", "32", "--rank", "2", "--device", "cpu"])
    assert report["steps"] == 2 and report["merged_perplexity"] > 1


def test_push_to_hub_example_uploads_one_commit_with_the_card(pruned, monkeypatch, tmp_path):
    commits = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **k: type("R", (), {"repo_id": repo_id})())
    monkeypatch.setattr(HfApi, "create_commit", lambda self, repo_id, operations, commit_message, **k: commits.append(
        {op.path_in_repo: op.path_or_fileobj for op in operations}) or "done")
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"zero_shot": {"piqa": 0.5}}))
    load_example("push_to_hub").main([str(pruned[0]), "me/tiny-2of4", "--base-model", "Qwen/Qwen2-0.5B",
                                      "--license", "apache-2.0", "--results", str(results), "--perplexity", "9.5",
                                      "--token", "hf_x"])
    (files,) = commits
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(files)


def test_push_to_hub_example_dry_run_prints_the_card(pruned, capsys):
    card = load_example("push_to_hub").main([str(pruned[0]), "me/tiny-2of4", "--base-model", "Qwen/Qwen2-0.5B",
                                             "--license", "mit", "--perplexity", "9.5", "--dry-run"])
    parsed = ModelCard(capsys.readouterr().out)
    assert parsed.data.base_model == "Qwen/Qwen2-0.5B" and parsed.data.license == "mit"
    assert "| perplexity | 9.50 |" in card.text


@pytest.mark.slow
def test_finetune_lora_runs_on_the_real_model_for_a_few_steps(tmp_path):
    report = load_example("finetune_lora").main(["--steps", "3", "--batch-size", "1", "--seq-len", "128",
                                                 "--prune-samples", "8", "--eval-windows", "4", "--device", "cpu"])
    assert report["merged_perplexity"] < 10 * report["sparse_perplexity"]
    assert torch.isfinite(torch.tensor(report["lora_perplexity"]))
