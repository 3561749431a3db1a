"""Smoke runs of the research/ diagnostics (not run by CI: `PYTHONPATH=. python -m pytest research`).

The error-row and member-error runs load the real SmolLM2-135M; the others use a tiny random model.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import save_tiny_dense

REPO = Path(__file__).resolve().parents[1]


def run_script(name, *args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, str(REPO / "research" / name), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def table_rows(text, first_cell):
    """Rows of Markdown tables whose first cell is `first_cell`, split into cells."""
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row] for row in rows if row[0].strip() == first_cell]


def test_bench_residual_energy_reports_shares_of_a_tiny_model(tmp_path):
    save_tiny_dense(tmp_path / "tiny", family="llama")
    out = run_script("bench_residual_energy.py", "--model", str(tmp_path / "tiny"), "--samples", "1",
                     "--seq-len", "16", "--top", "2", "--every", "1")
    rows = [row for row in (line.strip("|").split("|") for line in out.splitlines() if line.startswith("|"))
            if row[0].strip().isdigit()]
    assert [int(row[0]) for row in rows] == [1, 2]  # the tiny model has 2 decoder layers
    assert all(0 < float(row[2]) <= 1 for row in rows)


@pytest.mark.slow
def test_bench_error_rows_reports_heuristic_and_learned_errors_on_smollm2():
    out = run_script("bench_error_rows.py", "--layers", "29", "--num-samples", "1", "--seq-len", "64")
    rows = table_rows(out, "29")
    assert [row[1] for row in rows] == ["o_proj", "down_proj"]
    for row in rows:
        heuristic, learned = (float(x) for x in row[4].split(" / "))
        assert 0 < learned <= heuristic  # the learned permutation never loses on its own objective


@pytest.mark.slow
def test_bench_member_errors_reports_every_member_of_the_shared_input_groups():
    out = run_script("bench_member_errors.py", "--layers", "29", "--metric", "wanda", "--num-samples", "1",
                     "--seq-len", "64")
    rows = table_rows(out, "wanda")
    assert [row[3] for row in rows] == ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
    for group in ("q_proj", "gate_proj"):
        shares = [float(row[4]) for row in rows if row[2] == group]
        assert sum(shares) == pytest.approx(1, abs=2e-3) and all(0 < s < 1 for s in shares)
        heuristic, learned = ([float(row[col]) for row in rows if row[2] == group] for col in (5, 6))
        assert sum(learned) <= sum(heuristic) * (1 + 1e-4)  # the objective is the members' mean error
    assert all(0 < float(row[5]) < 1 and 0 < float(row[6]) < 1 for row in rows)


def test_bench_layer_damage_scores_each_layer_and_the_joint_model(tmp_path):
    save_tiny_dense(tmp_path / "tiny", family="llama")
    common = ["--model", str(tmp_path / "tiny"), "--num-samples", "2", "--seq-len", "32"]
    out = run_script("bench_layer_damage.py", *common, "--eval-windows", "2")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["layer"] for r in rows] == [0, 1]  # the tiny model has 2 decoder layers
    for r in rows:  # the learned permutation starts from the heuristic one and keeps the best: never worse
        assert 0 < r["learned_error"] <= r["heuristic_error"] + 1e-7
        assert r["heuristic_kl"] > 0 and r["learned_kl"] > 0
    assert re.search(r"learned lower on \d/2 layers \(error\)", out)
    joint = [json.loads(line) for line in run_script("bench_layer_damage.py", *common, "--joint").splitlines()
             if line.startswith("{")]
    assert [r["method"] for r in joint] == ["heuristic", "learned"] and all(r["perplexity"] > 1 for r in joint)


def test_block_scope_windows_compares_learned_permutations_with_the_heuristic_per_window(tmp_path):
    save_tiny_dense(tmp_path / "tiny", family="llama")
    out = run_script("block_scope_windows.py", "--model", str(tmp_path / "tiny"), "--layers", "1", "--cal-windows", "3",
                     "--heldout-windows", "2", "--windows", "3", "--steps", "2", "--seq-len", "32")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert rows and all(r["layer"] == 1 for r in rows)
    for r in rows:  # the block scope keeps the best permutation on its own windows: never above the heuristic there
        assert float(r["cal/mean"]["block3"]) <= float(r["cal/mean"]["heuristic"]) + 1e-6
        assert r["heldout/block3-heuristic"]["lower_on"].endswith("/2")


def test_per_linear_headroom_scores_shared_and_per_linear_permutations_of_a_tiny_model(tmp_path):
    save_tiny_dense(tmp_path / "tiny", family="llama")
    out = run_script("per_linear_headroom.py", "--model", str(tmp_path / "tiny"), "--layers", "1",
                     "--num-samples", "2", "--seq-len", "32", "--mu", "0")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["group"] for r in rows] == ["q_proj+k_proj+v_proj", "gate_proj+up_proj"]  # shared-input groups only
    for r in rows:
        shared, split = ("q+k+v", "q|k|v") if r["group"].startswith("q") else ("gate+up", "gate|up")
        splits = [key for key in r if key.startswith("wanda/") and "/member/" not in key]
        assert len(splits) == (5 if len(shared.split("+")) == 3 else 2)  # every partition of the members
        for perm in (shared, split):
            wanda, gram = r[f"wanda/{perm}"], r[f"gram0.0/{perm}"]
            assert all(0 < x < 1 for x in wanda + gram)
            assert gram[0] <= wanda[0] + 1e-5  # at mu = 0 the Gram mask never raises the calibration error


def test_weight_update_headroom_refit_never_raises_the_calibration_error_of_its_mask(tmp_path):
    save_tiny_dense(tmp_path / "tiny", family="llama")
    out = run_script("weight_update_headroom.py", "--model", str(tmp_path / "tiny"), "--layers", "1",
                     "--num-samples", "2", "--seq-len", "32", "--damps", "0.01")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(rows) == 4  # q/k/v, o, gate/up, down
    for r in rows:
        for mask in ("sparsegpt", "wanda", "gram0.3", "gram0"):
            assert r[f"{mask}/refit0.01"][0] <= r[f"{mask}/none"][0] + 1e-4  # on calibration, up to the damping


def test_obs_permutation_headroom_per_row_choice_is_the_lower_of_its_candidates(tmp_path):
    save_tiny_dense(tmp_path / "tiny", family="llama")
    out = run_script("obs_permutation_headroom.py", "--model", str(tmp_path / "tiny"), "--layers", "1",
                     "--num-samples", "2", "--seq-len", "32")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(rows) == 4  # q/k/v, o, gate/up, down
    for r in rows:
        for perm in ("wanda", "obs"):
            best = r[f"{perm}/per-row-best"][0]  # chosen per row on calibration: never above either candidate
            assert best <= min(r[f"{perm}/lsq"][0], r[f"{perm}/gram-refit"][0]) + 1e-5
            assert r[f"{perm}/lsq"][0] <= r[f"{perm}/sparsegpt"][0] + 1e-4


def test_per_linear_end_to_end_gives_the_split_linears_their_own_permutation(tmp_path):
    save_tiny_dense(tmp_path / "tiny", family="llama")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, str(REPO / "research" / "per_linear_end_to_end.py"), "--split", "q_proj",
                           "v_proj", "--methods", "wanda+cp", "--model", str(tmp_path / "tiny"), "--num-samples", "2",
                           "--seq-len", "16", "--eval-windows", "1"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "layer 0 groups: ['self_attn.k_proj', 'self_attn.q_proj', 'self_attn.v_proj'," in done.stderr
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["method"] == "wanda+cp, own permutation: q_proj v_proj" and row["perplexity"] > 1


def test_lsq_swap_search_never_raises_the_calibration_error(tmp_path):
    save_tiny_dense(tmp_path / "tiny", family="llama")
    out = run_script("lsq_swap_search.py", "--model", str(tmp_path / "tiny"), "--layers", "0", "--groups", "o_proj",
                     "--num-samples", "2", "--seq-len", "32", "--seconds", "3")
    row = json.loads(out.strip().splitlines()[-1])
    assert row["group"] == "self_attn.o_proj" and row["swaps_tried"] > 0
    assert row["end_cal"] <= row["start_cal"]
    assert (row["end_cal"] < row["start_cal"]) == (row["swaps_kept"] > 0)


@pytest.mark.parametrize("family", ["opt", "qwen2"])
def test_train_small_lm_writes_a_model_that_loads_and_predicts_its_text(tmp_path, family):
    out = run_script("train_small_lm.py", "--family", family, "--out", str(tmp_path / "m"), "--vocab", "400",
                     "--hidden", "64", "--layers", "1", "--seq-len", "64", "--batch", "2", "--steps", "30")
    log = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert log[-2]["loss"] < log[0]["loss"]  # it learned something
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert model.config.model_type == family and model.config.vocab_size == len(tokenizer)


def test_gram_mask_sweeps_traces_every_budget_on_a_tiny_model(tmp_path):
    save_tiny_dense(tmp_path / "tiny", family="llama")
    out = run_script("gram_mask_sweeps.py", "--model", str(tmp_path / "tiny"), "--layers", "1", "--num-samples", "2",
                     "--seq-len", "32", "--sweeps", "3")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert {row["group"] for row in rows} >= {"mlp.down_proj"}
    for row in rows:
        assert [step["k"] for step in row["sweeps"]] == [1, 2, 3]
        first = row["sweeps"][0]
        assert first["visited"] == row["rows"] and first["cal"] <= row["wanda"]["cal"]  # never worse than its start


def test_joint_candidates_ceiling_scores_every_candidate_and_its_start_is_the_heuristic(tmp_path):
    save_tiny_dense(tmp_path / "tiny", family="llama")
    out = run_script("joint_candidates_ceiling.py", "--method", "gram+learned-model", "--steps", "3", "--learned-layers",
                     "1", "--model", str(tmp_path / "tiny"), "--num-samples", "8", "--seq-len", "16", "--eval-windows", "2")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    reference, candidates = rows[0], rows[1:]
    assert reference["method"] == "gram+cp" and reference["candidate_step"] is None
    assert sorted(row["candidate_step"] for row in candidates) == [0, 1, 2, 3]
    shipped = [row for row in candidates if row["shipped"]]
    assert len(shipped) == 1 and shipped[0]["candidate_heldout_loss"] == min(r["candidate_heldout_loss"] for r in candidates)
    # one learned layer: the start, pruned with its permutations fixed, is the model of `gram` + heuristic
    start = next(row for row in candidates if row["candidate_step"] == 0)
    assert (start["perplexity"], start["kl_to_dense"]) == (reference["perplexity"], reference["kl_to_dense"])
