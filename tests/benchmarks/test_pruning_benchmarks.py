"""The accuracy benchmark scripts' own logic: method names, the results table, the heuristic timing run."""

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_method_names_map_to_config_arguments():
    parse = _load("bench_pruning").parse_method
    assert parse("dense") == {}
    assert parse("wanda") == {"metric": "wanda", "permutation": "none"}
    assert parse("ria+cp") == {"metric": "ria", "permutation": "heuristic"}
    assert parse("sparsegpt+learned") == {"metric": "sparsegpt", "permutation": "learned", "learner": "sinkhorn"}
    assert parse("wanda+learned-ot-model") == {"metric": "wanda", "permutation": "learned", "learner": "ot", "scope": "model"}
    for wrong in ("wanda+learned-block", "wanda+heuristic", "wanda+cp-ot"):
        with pytest.raises(ValueError, match="Unknown method"):
            parse(wrong)


def test_table_reports_the_share_of_the_wanda_gap_closed():
    table = _load("bench_pruning").table
    rows = [{"method": "dense", "sparsity": "-", "perplexity": 10.0, "prune_seconds": 0, "peak_rss_gb": 1},
            {"method": "wanda", "sparsity": "2:4", "perplexity": 30.0, "prune_seconds": 1, "peak_rss_gb": 1},
            {"method": "wanda+cp", "sparsity": "2:4", "perplexity": 20.0, "prune_seconds": 2, "peak_rss_gb": 1}]
    lines = table(rows).splitlines()
    assert len(lines) == 5 and "| wanda+cp | 2:4 | 20.00 | 50% |" in lines[-1]


def test_heuristic_benchmark_runs_and_never_loses_to_the_identity(capsys):
    _load("bench_heuristic").main(["--shapes", "64x128"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 64x128")]
    assert rows and all("+" in row.split("|")[4] for row in rows)


def test_seed_summary_pairs_each_method_with_its_own_heuristic_on_common_seeds():
    summary = _load("seed_summary").summary
    rows = [{"method": m, "sparsity": "2:4", "num_samples": 16, "seed": s, "perplexity": p}
            for m, s, p in [("wanda+cp", 0, 70.0), ("wanda+cp", 1, 76.0), ("wanda+cp", 2, 71.0),
                            ("wanda+learned", 0, 66.0), ("wanda+learned", 1, 74.0),  # seed 2 missing
                            ("ria+cp", 0, 74.0), ("ria+learned", 0, 80.0)]]
    rows.append({"method": "wanda+learned", "sparsity": "2:4", "num_samples": 64, "seed": 0, "perplexity": 1.0})
    rows.append({"method": "wanda+learned", "sparsity": "2:4", "num_samples": 16, "seed": 0, "perplexity": 1.0,
                 "keep_dense": ["q_proj", "k_proj"]})
    lines = {tuple(c.strip() for c in line.strip("|").split("|")[:4]): line for line in summary(rows, None).splitlines()}
    learned = lines[("wanda+learned", "2:4", "16", "-")]
    assert "-3.00 +/- 1.00 (2 seeds)" in learned and "| 2/2 |" in learned  # diffs -4 and -2: mean -3, s.e. 1
    assert "+6.00 (1 seed)" in lines[("ria+learned", "2:4", "16", "-")]  # paired with ria+cp, not wanda+cp
    assert lines[("wanda+learned", "2:4", "64", "-")].endswith("| - | - |")  # no heuristic at 64 samples
    assert lines[("wanda+learned", "2:4", "16", "q_proj k_proj")].endswith("| - | - |")  # another setting
    against = summary(rows, "wanda+learned").splitlines()
    assert any(line.startswith("| wanda+cp | 2:4 | 16 |") and "+3.00 +/- 1.00" in line for line in against)


def test_seed_summary_keeps_joint_training_settings_apart_and_pairs_them_with_the_metrics_heuristic():
    summary = _load("seed_summary").summary
    rows = [{"method": "wanda+cp", "sparsity": "2:4", "num_samples": 64, "seed": s, "perplexity": p}
            for s, p in [(0, 70.0), (1, 72.0)]]
    for loss, values in [("cosine", (71.0, 73.0)), ("standardised", (69.0, 70.0))]:
        rows += [{"method": "wanda+learned-model", "sparsity": "2:4", "num_samples": 64, "seed": s, "perplexity": p,
                  "learned_layers": 6, "joint_loss": loss, "joint": {"steps": 32}} for s, p in enumerate(values)]
    lines = {line.split("|")[1].strip(): line for line in summary(rows, None).splitlines()}
    assert "+1.00 +/- 0.00 (2 seeds)" in lines["wanda+learned-model (last 6, cosine, 32 steps)"]
    assert "-1.50 +/- 0.50 (2 seeds)" in lines["wanda+learned-model (last 6, standardised, 32 steps)"]


def test_seed_summary_compares_another_field_and_skips_rows_without_it():
    summary = _load("seed_summary").summary
    rows = [{"method": m, "sparsity": "2:4", "num_samples": 64, "seed": s, "perplexity": 50.0, "kl_to_dense": kl}
            for m, s, kl in [("wanda+cp", 0, 1.5), ("wanda+cp", 1, 1.6), ("gram+cp", 0, 1.3), ("gram+cp", 1, 1.3)]]
    rows.append({"method": "gram+cp", "sparsity": "2:4", "num_samples": 64, "seed": 2, "perplexity": 40.0})  # no KL
    gram = next(line for line in summary(rows, "wanda+cp", "kl_to_dense").splitlines() if line.startswith("| gram+cp"))
    assert "s0: 1.3000, s1: 1.3000 |" in gram and "-0.2500 +/- 0.0500 (2 seeds)" in gram and "| 2/2 |" in gram
