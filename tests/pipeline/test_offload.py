"""Pruning accelerate-offloaded models: same result as in memory, layers written back to a CPU store, disk refused."""

import copy

import pytest
import torch
from accelerate import cpu_offload, disk_offload
from accelerate.hooks import AlignDevicesHook, add_hook_to_module
from accelerate.utils import named_module_tensors
from transformers import AutoModelForCausalLM

from optimum_permllm import PermLLMConfig, PermutedSparseLinear
from optimum_permllm.nn.permuted_norm import PermutedOutputNorm
from optimum_permllm.pipeline.layerwise import sparsify_layerwise

from ..conftest import save_tiny_dense, tiny_model
from ..data.tiny_text import SENTENCES

CPU = torch.device("cpu")
TEXT = [" ".join(SENTENCES) * 4] * 8


def _ids(batch=4, length=24, vocab=128, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _decoder_layers(model):
    inner = model.model
    return inner.decoder.layers if hasattr(inner, "decoder") else inner.layers


def _sparse_count(model):
    return sum(isinstance(m, PermutedSparseLinear) for m in model.modules())


@pytest.mark.parametrize("family, metric", [("llama", "wanda"), ("opt", "sparsegpt")])
def test_cpu_offloaded_model_prunes_to_the_same_logits_as_in_memory(family, metric):
    reference = tiny_model(family)
    offloaded = cpu_offload(copy.deepcopy(reference), execution_device=CPU)
    for model in (reference, offloaded):
        sparsify_layerwise(model, _ids(), PermLLMConfig(metric=metric).to_plan(), progress=False)
    assert _sparse_count(offloaded) == _sparse_count(reference) > 0
    with torch.no_grad():
        assert torch.equal(offloaded(_ids(seed=1)).logits, reference(_ids(seed=1)).logits)


def test_pruned_offloaded_layer_lives_in_its_cpu_store_and_holds_meta_tensors():
    reference = tiny_model("llama")
    offloaded = cpu_offload(copy.deepcopy(reference), execution_device=CPU)
    original_store = offloaded.model.embed_tokens._hf_hook.weights_map.dataset  # the dict cpu_offload made
    for model in (reference, offloaded):
        sparsify_layerwise(model, _ids(), PermLLMConfig().to_plan(), progress=False)
    with torch.no_grad():
        offloaded(_ids(seed=1))
    for index, (layer, dense) in enumerate(zip(_decoder_layers(offloaded), _decoder_layers(reference))):
        store = layer._hf_hook.weights_map
        expected = dense.state_dict()
        assert isinstance(layer.input_layernorm, PermutedOutputNorm)
        new_keys = {"self_attn.q_proj.input_perm", "self_attn.q_proj.weight_mask", "input_layernorm.output_perm"}
        assert new_keys < store.keys()
        assert set(store) == set(expected)
        assert all(store[k].device == CPU and torch.equal(store[k], expected[k]) for k in expected)
        assert all(t.is_meta for _, t in named_module_tensors(layer, include_buffers=True, recurse=True))
        assert all(m._dense is None for m in layer.modules() if isinstance(m, PermutedSparseLinear))
        assert not any(key.startswith(f"model.layers.{index}.") for key in original_store)  # dense copy freed
    assert "input_perm=offloaded" in repr(offloaded)  # printing never reads the meta placeholders


def test_prune_on_load_with_a_cpu_device_map_then_save_and_reload(tmp_path):
    tokenizer = save_tiny_dense(tmp_path / "dense", "llama")
    # "cpu" entries are offloaded when the main device is another one; torch.device("cpu") plays the GPU here.
    device_map = {"model.embed_tokens": CPU, "model.layers.0": "cpu", "model.layers.1": CPU, "model.norm": CPU,
                  "model.rotary_emb": CPU, "lm_head": CPU}
    config = dict(metric="wanda", permutation="heuristic", dataset=TEXT, num_samples=4, seq_len=32)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=PermLLMConfig(**config))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=PermLLMConfig(**config),
                                                 device_map=device_map)
    offloaded, resident = model.model.layers
    assert offloaded.self_attn.q_proj.weight.is_meta and not resident.self_attn.q_proj.weight.is_meta
    ids = tokenizer(SENTENCES[0], return_tensors="pt").input_ids
    expected = reference(ids).logits
    assert torch.equal(model(ids).logits, expected)
    with pytest.warns(UserWarning, match="offloaded modules"):
        model.save_pretrained(tmp_path / "sparse")
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "sparse")(ids).logits, expected)
    dense = model.dequantize()  # transformers' call: the offloaded layer is converted in its CPU store
    assert _sparse_count(dense) == 0 and dense.model.layers[0].self_attn.q_proj.weight.is_meta
    torch.testing.assert_close(dense(ids).logits, expected, rtol=1e-4, atol=1e-5)  # sums in the original column order


def test_disk_offloaded_model_is_refused_before_any_change(tmp_path):
    model = disk_offload(tiny_model("opt"), tmp_path / "offload", execution_device=CPU)
    with torch.no_grad():
        before = model(_ids(seed=1)).logits
    with pytest.raises(ValueError, match=r"layers\.0 is offloaded to disk.*CPU offload instead.*device='cuda'"):
        sparsify_layerwise(model, _ids(), PermLLMConfig().to_plan(), progress=False)
    assert _sparse_count(model) == 0
    with torch.no_grad():
        assert torch.equal(model(_ids(seed=1)).logits, before)


def test_device_map_with_a_disk_layer_is_refused_on_load(tmp_path):
    save_tiny_dense(tmp_path / "dense", "llama")
    device_map = {"model.embed_tokens": CPU, "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": CPU,
                  "model.rotary_emb": CPU, "lm_head": CPU}
    config = PermLLMConfig(metric="wanda", dataset=TEXT, num_samples=4, seq_len=32)
    with pytest.raises(ValueError, match=r"model\.layers\.1 is offloaded to disk"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=config, device_map=device_map,
                                             offload_folder=tmp_path / "offload")


def test_offloading_a_block_that_holds_the_layers_is_refused():
    model = tiny_model("llama")
    add_hook_to_module(model.model, AlignDevicesHook(execution_device=CPU, offload=True, place_submodules=True))
    with pytest.raises(ValueError, match="'model' as one block.*own device_map entry"):
        sparsify_layerwise(model, _ids(), PermLLMConfig().to_plan(), progress=False)


def test_offloaded_layer_with_a_tensor_no_hook_loads_is_refused_before_any_change():
    model = cpu_offload(tiny_model("llama"), execution_device=CPU)
    model.model.layers[1].mlp.register_buffer("orphan", torch.empty(4, device="meta"))
    message = r"layers\.1 has meta tensors that no accelerate hook loads: \['mlp\.orphan'\]"
    with pytest.raises(ValueError, match=message):
        sparsify_layerwise(model, _ids(), PermLLMConfig().to_plan(), progress=False)
    assert _sparse_count(model) == 0


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_dequantize_an_offloaded_pruned_model_keeps_it_offloaded_and_equal(family):
    from optimum_permllm import PermLLMSparsifier

    reference = tiny_model(family)
    offloaded = cpu_offload(copy.deepcopy(reference), execution_device=CPU)
    config = PermLLMConfig(metric="wanda", permutation="heuristic")
    for model in (reference, offloaded):
        sparsify_layerwise(model, _ids(), config.to_plan(), progress=False)
        PermLLMSparsifier.dequantize_model(model)
    assert _sparse_count(offloaded) == 0
    assert not any(isinstance(m, PermutedOutputNorm) for m in offloaded.modules())
    with torch.no_grad():
        assert torch.equal(offloaded(_ids(seed=1)).logits, reference(_ids(seed=1)).logits)
    for layer, dense in zip(_decoder_layers(offloaded), _decoder_layers(reference)):
        assert all(t.is_meta for _, t in named_module_tensors(layer, include_buffers=True, recurse=True))
        store, expected = layer._hf_hook.weights_map, dense.state_dict()
        assert set(store) == set(expected) and all(torch.equal(store[k], expected[k]) for k in expected)


@pytest.mark.parametrize("learned_layers", [None, 1])
def test_model_scope_on_an_offloaded_model_learns_and_prunes_as_in_memory(learned_layers):
    # the joint training loads the learned layers from their CPU store for the whole training and writes them
    # back; the layers before them are pruned one at a time as usual
    config = PermLLMConfig(permutation="learned", scope="model", steps=6, block_size=32, learned_layers=learned_layers)
    reference = tiny_model("llama")
    offloaded = cpu_offload(copy.deepcopy(reference), execution_device=CPU)
    infos = []
    for model in (reference, offloaded):
        sparsify_layerwise(model, _ids(batch=8), config.to_plan(), progress=False,
                           callback=lambda index, info: infos.append(info.get("joint")))
    reference_info, offloaded_info = [info for info in infos if info is not None]
    assert offloaded_info["heldout_history"] == reference_info["heldout_history"]
    assert reference_info["best_step"] > 0  # learned permutations were shipped, not the heuristic start
    assert _sparse_count(offloaded) == _sparse_count(reference) == 14
    with torch.no_grad():
        offloaded(_ids(seed=1))
        assert torch.equal(offloaded(_ids(seed=1)).logits, reference(_ids(seed=1)).logits)
    for layer, dense in zip(_decoder_layers(offloaded), _decoder_layers(reference)):
        assert all(t.is_meta for _, t in named_module_tensors(layer, include_buffers=True, recurse=True))
        store, expected = layer._hf_hook.weights_map, dense.state_dict()
        assert set(store) == set(expected) and all(torch.equal(store[k], expected[k]) for k in expected)
