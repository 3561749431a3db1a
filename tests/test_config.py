"""PermLLMConfig: validation with clear errors, and round trips through dict and JSON."""

import json

import pytest

from optimum_permllm import PermLLMConfig
from optimum_permllm.config import FORMAT_VERSION


# Every field set away from its default, and the dict it must give, written out by hand: a field that
# to_dict drops, renames or changes shows up as a difference.
EVERY_FIELD = dict(sparsity="4:8", metric="ria", permutation="learned", learner="ot", scope="model", block_size=32,
                   steps=10, learned_layers=4, lr=0.01, damp=0.05, dataset="wikitext", tokenizer="my/tokenizer", num_samples=16,
                   seq_len=256, seed=3, modules_to_not_convert="o_proj", fold_permutations="all",
                   converted_modules=["model.layers.0.mlp.up_proj"],
                   permuted_norms={"model.layers.0.post_attention_layernorm": ["mlp.up_proj"]})
EXPECTED_DICT = {
    "quant_method": "permllm", "sparsity": "4:8", "metric": "ria", "permutation": "learned", "learner": "ot",
    "scope": "model", "block_size": 32, "steps": 10, "learned_layers": 4, "lr": 0.01, "damp": 0.05, "dataset": "wikitext",
    "tokenizer": "my/tokenizer", "num_samples": 16, "seq_len": 256, "seed": 3, "modules_to_not_convert": ["o_proj"],
    "fold_permutations": "all", "format_version": 1, "converted_modules": ["model.layers.0.mlp.up_proj"],
    "permuted_norms": {"model.layers.0.post_attention_layernorm": ["mlp.up_proj"]},
}


def test_to_dict_records_every_field():
    assert FORMAT_VERSION == 1  # EXPECTED_DICT was written for format 1
    assert PermLLMConfig(**EVERY_FIELD).to_dict() == EXPECTED_DICT


def test_round_trip_through_dict_and_json(tmp_path):
    config = PermLLMConfig(**EVERY_FIELD)
    assert PermLLMConfig.from_dict(config.to_dict()).to_dict() == EXPECTED_DICT
    config.to_json_file(tmp_path / "c.json")
    assert PermLLMConfig.from_dict(json.loads((tmp_path / "c.json").read_text())).to_dict() == EXPECTED_DICT


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


def test_one_module_name_given_as_a_string_is_one_name():
    assert PermLLMConfig(modules_to_not_convert="o_proj").modules_to_not_convert == ["o_proj"]


def test_string_modules_to_not_convert_leaves_that_layer_dense():
    import torch

    from optimum_permllm import PermLLMSparsifier

    from .conftest import tiny_model

    model = tiny_model("llama")
    PermLLMSparsifier(PermLLMConfig(metric="magnitude", permutation="none", modules_to_not_convert="o_proj")) \
        .sparsify_model(model)
    assert type(model.model.layers[0].self_attn.o_proj) is torch.nn.Linear
    assert type(model.model.layers[0].self_attn.q_proj) is not torch.nn.Linear


def test_the_removed_block_scope_is_refused_for_pruning_but_a_checkpoint_pruned_with_it_loads():
    with pytest.raises(ValueError, match="scope='block' was removed.*scope='layer'"):
        PermLLMConfig(permutation="learned", scope="block")
    record = PermLLMConfig(permutation="learned").to_dict()
    record.update(scope="block", converted_modules=["model.layers.0.mlp.up_proj"])
    assert PermLLMConfig.from_dict(record).scope == "block"


@pytest.mark.parametrize("dataset", ["", "   "])
def test_empty_dataset_name_is_refused(dataset):
    with pytest.raises(ValueError, match="dataset='' names no calibration text"):
        PermLLMConfig(dataset=dataset)


@pytest.mark.parametrize("settings", [dict(learner="ot"), dict(scope="model"), dict(block_size=32), dict(steps=5),
                                      dict(lr=0.1)])
@pytest.mark.parametrize("permutation", ["none", "heuristic"])
def test_learned_only_settings_with_another_permutation_are_warned_about(settings, permutation):
    (name, value), = settings.items()
    with pytest.warns(UserWarning, match=rf"{name}={value!r} only apply to permutation='learned'"):
        PermLLMConfig(permutation=permutation, **settings)


def test_learned_settings_with_learned_permutation_are_not_warned_about(recwarn):
    PermLLMConfig(permutation="learned", learner="ot", steps=5, block_size=32)
    PermLLMConfig(permutation="heuristic")
    assert not [w for w in recwarn if "only apply" in str(w.message)]


@pytest.mark.parametrize("version", ["1", 1.0, True])
def test_format_version_of_the_wrong_type_is_a_type_error(version):
    with pytest.raises(TypeError, match="format_version must be an integer"):
        PermLLMConfig(format_version=version)


@pytest.mark.parametrize("damp", [0, -0.1, "0.1", None])
def test_damp_must_be_positive(damp):
    with pytest.raises(ValueError, match="damp must be a positive number"):
        PermLLMConfig(damp=damp)


def _sparse_and_dense(model):
    """The names of the model's sparse layers and of the nn.Linear layers left in its decoder stack."""
    import torch

    from optimum_permllm import PermutedSparseLinear

    sparse = {n for n, m in model.named_modules() if isinstance(m, PermutedSparseLinear)}
    dense = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear and ".layers." in n}
    return sparse, dense


@pytest.mark.parametrize("metric, permutation", [("magnitude", "none"), ("wanda", "heuristic")])
@pytest.mark.parametrize("skip, kept_dense", [
    (["model.layers.0"], lambda name: name.startswith("model.layers.0.")),
    (["self_attn"], lambda name: ".self_attn." in name),
    (["layers.1.mlp"], lambda name: name.startswith("model.layers.1.mlp.")),
])
def test_a_parent_module_name_keeps_every_linear_under_it_dense(skip, kept_dense, metric, permutation):
    from optimum_permllm import PermLLMSparsifier

    from .conftest import tiny_model
    from .data.tiny_text import SENTENCES, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", vocab=len(tokenizer))
    linears = {n for n, m in model.named_modules() if type(m).__name__ == "Linear" and ".layers." in n}
    config = PermLLMConfig(metric=metric, permutation=permutation, modules_to_not_convert=skip,
                           dataset=[" ".join(SENTENCES) * 4] * 4, num_samples=4, seq_len=32)
    PermLLMSparsifier(config).sparsify_model(model, tokenizer, progress=False)
    sparse, dense = _sparse_and_dense(model)
    assert dense == {n for n in linears if kept_dense(n)} and dense
    assert sparse == linears - dense and sparse
    assert sorted(sparse) == config.converted_modules


@pytest.mark.parametrize("skip, suggestion", [
    ("self_atn", "self_attn"), ("model.layer.0", "model.layers.0"), ("q_prj", "q_proj"), ("mlp.down", "mlp.down_proj"),
])
def test_a_module_name_that_matches_nothing_is_refused_with_near_matches(skip, suggestion):
    from optimum_permllm import PermLLMSparsifier

    from .conftest import tiny_model

    model = tiny_model("llama")
    config = PermLLMConfig(metric="magnitude", permutation="none", modules_to_not_convert=["lm_head", skip])
    with pytest.raises(ValueError, match="modules_to_not_convert") as info:
        PermLLMSparsifier(config).sparsify_model(model)
    assert repr(skip) in str(info.value) and repr(suggestion) in str(info.value)
    assert "'lm_head'" not in str(info.value)  # the name that does match is not blamed
    assert _sparse_and_dense(model)[0] == set()  # refused before anything changed


def test_a_device_given_to_the_config_says_where_it_goes():
    with pytest.raises(TypeError, match=r"sparsify_model\(model, tokenizer, device='cuda'\)"):
        PermLLMConfig(device="cuda")


def test_sparsifying_on_an_unavailable_device_is_refused_before_any_change(monkeypatch):
    import torch

    from optimum_permllm import PermLLMSparsifier

    from .conftest import tiny_model
    from .data.tiny_text import SENTENCES, tiny_tokenizer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", vocab=len(tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = PermLLMConfig(dataset=[" ".join(SENTENCES) * 4] * 4, num_samples=4, seq_len=32)
    with pytest.raises(ValueError, match="device 'cuda' is not available"):
        PermLLMSparsifier(config).sparsify_model(model, tokenizer, progress=False, device="cuda")
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
