"""The README's main job end to end on a tiny model folder: prune (its default method), evaluate, save, reload."""

import json
import math

import pytest

from optimum_permllm.commands import demo

from ..conftest import save_tiny_dense


def test_demo_prunes_with_its_default_method_and_reloads_bit_identical(tmp_path, capsys):
    save_tiny_dense(tmp_path / "dense", "llama")
    output = tmp_path / "sparse"
    report = demo.main(["--model", str(tmp_path / "dense"), "--num-samples", "4", "--seq-len", "64",
                        "--eval-windows", "1", "--output", str(output), "--device", "cpu"])
    defaults = demo.build_parser().parse_args([])
    saved = json.loads((output / "config.json").read_text())["quantization_config"]
    assert saved["permutation"] == defaults.permutation and saved["metric"] == defaults.metric
    assert report["reload_bit_identical"] is True
    assert math.isfinite(report["sparse_perplexity"]) and report["sparse_perplexity"] > 0
    on_disk = sum(f.stat().st_size for f in output.iterdir()) / 1e6
    assert report["checkpoint_mb"] == pytest.approx(on_disk, abs=0.1)
    captured = capsys.readouterr()
    assert [line[:5] for line in captured.err.splitlines() if line.startswith("[")] == [f"[{i}/5]" for i in range(1, 6)]
    assert json.loads(captured.out[captured.out.index("{"):]) == report  # stdout: the results, ending with the report
