"""bench_load_validation runs on a tiny model folder and reports the load and check times."""

import re

from ..conftest import tiny_model
from .test_bench_smoke import run_script


def test_bench_load_validation_on_a_tiny_model(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    out = run_script("bench_load_validation.py", "--model", str(tmp_path / "dense"), "--repeat", "1")
    match = re.search(r"14 sparse layers, \d+ torch threads: from_pretrained ([\d.]+) s .* tensor checks alone "
                      r"([\d.]+) ms", out)
    assert match and float(match.group(1)) > 0 and float(match.group(2)) > 0
