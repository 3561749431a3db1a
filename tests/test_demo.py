"""The README's main job end to end on a tiny model folder: prune (learned permutation), evaluate, save, reload."""

import json
import math

from optimum_permllm import demo

from .conftest import save_tiny_dense


def test_demo_prunes_with_the_learned_permutation_and_reloads_bit_identical(tmp_path):
    save_tiny_dense(tmp_path / "dense", "llama")
    output = tmp_path / "sparse"
    report = demo.main(["--model", str(tmp_path / "dense"), "--num-samples", "4", "--seq-len", "64",
                        "--eval-windows", "1", "--output", str(output), "--device", "cpu"])
    saved = json.loads((output / "config.json").read_text())["quantization_config"]
    assert saved["permutation"] == "learned" and saved["metric"] == "sparsegpt"
    assert report["reload_bit_identical"] is True
    assert math.isfinite(report["sparse_perplexity"]) and report["sparse_perplexity"] > 0
