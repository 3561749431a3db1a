"""Save/load through transformers: bit-exact logits for every family, dequantize, bad checkpoints."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_permllm import PermLLMConfig, PermLLMSparsifier, PermutedSparseLinear
from optimum_permllm.config import FORMAT_VERSION
from optimum_permllm.pipeline.structure import prunable_linears, set_submodule
from optimum_permllm.sparse import check_nm

from ..conftest import tiny_model


def _sparsify_with_random_permutations(model, n=2, m=4, seed=0):
    """Magnitude N:M on every decoder linear, each with a random input permutation."""
    generator = torch.Generator().manual_seed(seed)
    for name, linear in prunable_linears(model).items():
        perm = torch.randperm(linear.in_features, generator=generator)
        set_submodule(model, name, PermutedSparseLinear.from_linear(linear, n, m, perm=perm))
    config = PermLLMConfig(sparsity=f"{n}:{m}", metric="magnitude", permutation="none")
    config.converted_modules = sorted(k for k, v in model.named_modules() if isinstance(v, PermutedSparseLinear))
    model.config.quantization_config = config
    return model


def _ids(vocab=128):
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


def test_round_trip_gives_bit_identical_logits(family, tmp_path):
    model = _sparsify_with_random_permutations(tiny_model(family))
    reference = model(_ids()).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    sparse = {k: v for k, v in loaded.named_modules() if isinstance(v, PermutedSparseLinear)}
    assert len(sparse) == len(model.config.quantization_config.converted_modules) > 0
    for module in sparse.values():  # the pattern holds in the stored (permuted) order
        assert check_nm(module.permuted_dense_weight(), 2, 4)
    assert torch.equal(loaded(_ids()).logits, reference)


def test_sparsifier_magnitude_prunes_every_decoder_linear_but_not_lm_head(tmp_path):
    model = tiny_model("llama")
    PermLLMSparsifier(PermLLMConfig(metric="magnitude", permutation="none")).sparsify_model(model)
    assert isinstance(model.lm_head, torch.nn.Linear)
    linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == []
    assert len(model.config.quantization_config.converted_modules) == 2 * 7


def test_4_8_round_trip(tmp_path):
    model = _sparsify_with_random_permutations(tiny_model("qwen2"), n=4, m=8)
    reference = model(_ids()).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.quantization_config.sparsity == "4:8"
    assert torch.equal(loaded(_ids()).logits, reference)


def test_dtype_argument_casts_values_but_not_indices(tmp_path):
    model = _sparsify_with_random_permutations(tiny_model("llama"))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    layer = loaded.model.layers[0].mlp.down_proj
    assert layer.weight.dtype == torch.bfloat16
    assert layer.input_perm.dtype == torch.int64 and layer.weight_mask.dtype == torch.uint8
    source = model.model.layers[0].mlp.down_proj
    assert torch.equal(layer.weight, source.weight.to(torch.bfloat16))
    assert torch.equal(layer.input_perm, source.input_perm) and torch.equal(layer.weight_mask, source.weight_mask)
    torch.testing.assert_close(loaded(_ids()).logits.float(), model(_ids()).logits, rtol=0.05, atol=0.05)


def test_device_map_cpu_loads(tmp_path):
    model = _sparsify_with_random_permutations(tiny_model("llama"))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    assert torch.equal(loaded(_ids()).logits, model(_ids()).logits)


def test_config_json_records_method_and_format_version(tmp_path):
    model = _sparsify_with_random_permutations(tiny_model("llama"))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "permllm" and saved["format_version"] == FORMAT_VERSION
    assert saved["sparsity"] == "2:4" and "model.layers.0.mlp.down_proj" in saved["converted_modules"]


def test_dequantize_gives_a_plain_model_with_the_same_logits(tmp_path):
    model = _sparsify_with_random_permutations(tiny_model("opt"))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    reference = loaded(_ids()).logits
    dense = loaded.dequantize()
    assert not any(isinstance(m, PermutedSparseLinear) for m in dense.modules())
    assert getattr(dense.config, "quantization_config", None) is None
    torch.testing.assert_close(dense(_ids()).logits, reference, rtol=1e-4, atol=1e-5)
    dense.save_pretrained(tmp_path / "dense")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    torch.testing.assert_close(plain(_ids()).logits, reference, rtol=1e-4, atol=1e-5)


def test_newer_format_version_is_refused(tmp_path):
    model = _sparsify_with_random_permutations(tiny_model("llama"))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="newer than the version"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_missing_tensors_are_an_error_not_random_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _sparsify_with_random_permutations(tiny_model("llama"))
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.input_perm"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="incomplete.*up_proj.input_perm"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_truncated_checkpoint_is_an_error(tmp_path):
    model = _sparsify_with_random_permutations(tiny_model("llama"))
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(Exception, match="truncated|damaged|incomplete"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_loading_without_the_plugin_fails_instead_of_giving_random_weights(tmp_path):
    """With neither the import nor the installed .pth hook (`python -S` reads no .pth file; test_autoload.py)."""
    model = _sparsify_with_random_permutations(tiny_model("llama"))
    model.save_pretrained(tmp_path)
    code = (
        "from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode != 0
    assert "permllm" in result.stderr and "mismatch" in result.stderr.lower()


@pytest.mark.parametrize("fold", [True, "all"])
def test_folded_pipeline_model_round_trips_and_dequantizes(family, fold, tmp_path):
    from optimum_permllm.nn.permuted_norm import PermutedOutputNorm
    from optimum_permllm.pipeline.layerwise import sparsify_layerwise

    model = tiny_model(family)
    config = PermLLMConfig(metric="wanda", permutation="heuristic", fold_permutations=fold)
    config.converted_modules = sparsify_layerwise(model, _ids(), config.to_plan(), progress=False)
    model.config.quantization_config = config
    reference = model(_ids()).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert sum(isinstance(m, PermutedOutputNorm) for m in loaded.modules()) == 2 * loaded.config.num_hidden_layers
    assert torch.equal(loaded(_ids()).logits, reference)
    dense = loaded.dequantize()
    assert not any(isinstance(m, (PermutedOutputNorm, PermutedSparseLinear)) for m in dense.modules())
    torch.testing.assert_close(dense(_ids()).logits, reference, rtol=1e-4, atol=1e-5)
