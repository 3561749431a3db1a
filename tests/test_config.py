"""PermLLMConfig: validation with clear errors, and round trips through dict and JSON."""

import json

import pytest

from optimum_permllm import FORMAT_VERSION, PermLLMConfig


def test_round_trip_through_dict_and_json(tmp_path):
    config = PermLLMConfig(sparsity="4:8", metric="ria", permutation="learned", learner="ot", scope="layer",
                           block_size=32, steps=10, lr=0.01, num_samples=16, seq_len=256, seed=3,
                           modules_to_not_convert=["o_proj"])
    again = PermLLMConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    config.to_json_file(tmp_path / "c.json")
    assert PermLLMConfig.from_dict(json.loads((tmp_path / "c.json").read_text())).to_dict() == config.to_dict()
    assert config.to_dict()["quant_method"] == "permllm" and config.to_dict()["format_version"] == FORMAT_VERSION


def test_objects_are_recorded_by_name():
    class Tok:
        name_or_path = "my/tokenizer"

    config = PermLLMConfig(tokenizer=Tok(), dataset=["some", "text"])
    assert config.to_dict()["tokenizer"] == "my/tokenizer"
    assert config.to_dict()["dataset"] == "<in-memory>"


@pytest.mark.parametrize("kwargs,match", [
    ({"sparsity": "4:4"}, "0 < N < M"),
    ({"sparsity": "2by4"}, "N:M"),
    ({"metric": "obs"}, "metric='obs'.*magnitude"),
    ({"permutation": "random"}, "permutation"),
    ({"learner": "sgd"}, "learner"),
    ({"scope": "global"}, "scope"),
    ({"fold_permutations": "some"}, "fold_permutations"),
    ({"block_size": 0}, "block_size"),
    ({"num_samples": -1}, "num_samples"),
    ({"lr": -1.0}, "lr"),
])
def test_bad_values_name_the_field_and_the_choices(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PermLLMConfig(**kwargs)


def test_unknown_arguments_are_rejected():
    with pytest.raises(TypeError, match="unknown arguments.*sparsity_ratio"):
        PermLLMConfig(sparsity_ratio=0.5)


def test_newer_format_version_is_refused():
    with pytest.raises(ValueError, match="Upgrade"):
        PermLLMConfig(format_version=FORMAT_VERSION + 1)


def test_needs_calibration():
    assert not PermLLMConfig(metric="magnitude", permutation="none").needs_calibration
    assert PermLLMConfig(metric="magnitude", permutation="heuristic").needs_calibration
    assert PermLLMConfig(metric="wanda", permutation="none").needs_calibration
