"""The accuracy benchmark scripts' own logic: method names, the results table, the heuristic timing run."""

import importlib.util
from pathlib import Path

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
    assert parse("wanda+learned-ot-block") == {"metric": "wanda", "permutation": "learned", "learner": "ot", "scope": "block"}


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
