"""A prune that fails anywhere leaves the model exactly as it was: module types, tensors and config."""

import pytest
import torch

from optimum_permllm import PermLLMConfig, PermLLMSparsifier
from optimum_permllm.algorithms import sparsegpt
from optimum_permllm.pipeline import folding, layerwise, planning

from ..conftest import tiny_model
from ..data.tiny_text import SENTENCES, tiny_tokenizer

TEXT = [" ".join(SENTENCES) * 4] * 8


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _snapshot(model):
    return ({name: type(module) for name, module in model.named_modules()},
            {name: tensor.clone() for name, tensor in model.state_dict().items()})


def _same_values(a, b):
    """Equal value by value, a NaN matching a NaN (torch.equal says NaN != NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])


def _assert_unchanged(model, snapshot):
    types, tensors = snapshot
    assert {name: type(module) for name, module in model.named_modules()} == types
    state = model.state_dict()
    assert state.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert _same_values(state[name], tensor), name
    assert getattr(model.config, "quantization_config", None) is None
    assert not getattr(model, "is_quantized", False)


def _prune(model, tokenizer, **settings):
    config = PermLLMConfig(dataset=TEXT, num_samples=4, seq_len=32, **settings)
    return PermLLMSparsifier(config).sparsify_model(model, tokenizer, progress=False)


def _fail_on_call(monkeypatch, module, name, call):
    """Make module.name raise on its `call`-th call (counting from 1)."""
    original, calls = getattr(module, name), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError(f"injected failure in {name}")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)


@pytest.mark.parametrize("target, call", [
    ((layerwise, "plan_group"), 1),   # nothing replaced yet
    ((layerwise, "_replace_group"), 2),  # layer 0 halfway replaced
    ((layerwise, "plan_group"), 6),   # layer 0 replaced and folded, layer 1 being planned
    ((layerwise, "_replace_group"), 5),
    ((folding, "fold_layer_permutations"), 2),
    ((layerwise, "collect_statistics"), 2),
])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_any_failure_during_a_prune_leaves_the_model_as_it_was(family, target, call, tokenizer, monkeypatch):
    model = tiny_model(family, vocab=len(tokenizer))
    before = _snapshot(model)
    _fail_on_call(monkeypatch, *target, call)
    with pytest.raises(RuntimeError, match="injected failure"):
        _prune(model, tokenizer, metric="wanda", permutation="heuristic")
    _assert_unchanged(model, before)
    monkeypatch.undo()
    _prune(model, tokenizer, metric="wanda", permutation="heuristic")  # and the model can still be pruned


@pytest.mark.parametrize("permutation", ["none", "heuristic"])
@pytest.mark.parametrize("metric", ["magnitude", "wanda"])
def test_nan_weight_is_refused_before_any_change_naming_layer_and_tensor(metric, permutation, tokenizer):
    model = tiny_model("llama", vocab=len(tokenizer))
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[3, 5] = float("nan")
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight has 1 NaN"):
        _prune(model, tokenizer, metric=metric, permutation=permutation)
    _assert_unchanged(model, before)


def test_non_finite_calibration_inputs_are_refused_and_the_model_restored(tokenizer):
    model = tiny_model("llama", vocab=len(tokenizer))
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[0] = float("inf")
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"calibration inputs of model\.layers\.1\.mlp\.gate_proj contain NaN"):
        _prune(model, tokenizer, metric="wanda", permutation="heuristic")  # layer 0 was already pruned
    _assert_unchanged(model, before)


def test_sparsegpt_failure_names_the_damp_setting_and_restores_the_model(tokenizer, monkeypatch):
    model = tiny_model("llama", vocab=len(tokenizer))
    before = _snapshot(model)
    damps = []

    def failing_cholesky(h, damp):
        damps.append(damp)
        if len(damps) == 3:
            return original(-torch.eye(h.shape[0]), damp)  # not positive definite
        return original(h, damp)

    original = sparsegpt._inverse_hessian_cholesky
    monkeypatch.setattr(sparsegpt, "_inverse_hessian_cholesky", failing_cholesky)
    with pytest.raises(RuntimeError, match=r"PermLLMConfig\(damp=0\.1\)"):
        _prune(model, tokenizer, metric="sparsegpt", permutation="none", damp=0.05)
    assert set(damps) == {0.05}
    _assert_unchanged(model, before)


def test_block_size_that_does_not_divide_a_layer_is_reported(tokenizer, caplog, monkeypatch):
    monkeypatch.setattr(planning, "learn_group_permutation", lambda w, s, p, iw, c, loss_fn=None: (p, {}))
    model = tiny_model("llama", vocab=len(tokenizer))
    with caplog.at_level("WARNING"):
        _prune(model, tokenizer, metric="wanda", permutation="learned", block_size=48)
    assert "block_size=48" in caplog.text and "model.layers.0.self_attn.q_proj (in_features=64: block 32)" in caplog.text
