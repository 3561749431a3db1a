"""Gemma 3 on a tiny random config: every method through the public API, its norms, folding, round trip, LoRA.

Gemma 3 differs from LLaMA where folding can go wrong: q_norm / k_norm normalise the rows of q_proj and
k_proj per head, post_attention_layernorm and post_feedforward_layernorm normalise the outputs of o_proj
and down_proj, every norm scales by (1 + w), one KV head is wider (32) than hidden / heads (16), and a
sliding-window layer (window 8, shorter than the inputs) comes before a global one. The tiny model's norm
weights are random (tests/conftest.py), so a norm weight left behind by a permutation changes the logits.
"""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM

from optimum_permllm import PermLLMConfig, PermLLMSparsifier, PermutedSparseLinear
from optimum_permllm.integrations.peft import PermutedSparseLoraLinear
from optimum_permllm.nn.permuted_norm import PermutedOutputNorm
from optimum_permllm.pipeline.structure import set_submodule
from optimum_permllm.sparse import check_nm, is_identity

from ..conftest import tiny_model
from ..data.tiny_text import SENTENCES, tiny_tokenizer

TEXT = [" ".join(SENTENCES) * 4] * 8
LINEARS_PER_LAYER = 7


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def ids(tokenizer):
    ids = tokenizer(SENTENCES[2] + " " + SENTENCES[3], return_tensors="pt").input_ids
    assert ids.shape[1] > 2 * 8  # longer than the sliding window of layer 0
    return ids


def _gemma3(tokenizer):
    return tiny_model("gemma3", vocab=len(tokenizer))


def _prune(model, tokenizer, **settings):
    if settings.get("permutation") == "learned":
        settings = {"block_size": 16, "steps": 5, **settings}
    config = PermLLMConfig(dataset=TEXT, num_samples=4, seq_len=32, **settings)
    return PermLLMSparsifier(config).sparsify_model(model, tokenizer, progress=False)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("permutation", ["none", "heuristic", "learned"])
@pytest.mark.parametrize("metric", ["magnitude", "wanda", "ria", "gram", "sparsegpt", "lsq"])
def test_every_method_prunes_saves_reloads_bit_exact_and_dequantizes(metric, permutation, tokenizer, ids, tmp_path):
    model = _gemma3(tokenizer)
    _prune(model, tokenizer, metric=metric, permutation=permutation)
    sparse = [m for m in model.modules() if isinstance(m, PermutedSparseLinear)]
    assert len(sparse) == LINEARS_PER_LAYER * model.config.num_hidden_layers
    assert all(check_nm(m.permuted_dense_weight(), 2, 4) for m in sparse)
    if permutation == "none":
        assert all(m.has_identity_perm() for m in sparse)
        assert not any(isinstance(m, PermutedOutputNorm) for m in model.modules())
    reference = _logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(_logits(loaded, ids), reference)
    dense = loaded.dequantize()
    assert not any(isinstance(m, (PermutedSparseLinear, PermutedOutputNorm)) for m in dense.modules())
    torch.testing.assert_close(_logits(dense, ids), reference, rtol=1e-4, atol=1e-5)


def _norms(model):
    return {name: module for name, module in model.named_modules() if type(module).__name__.endswith("RMSNorm")}


@pytest.mark.parametrize("fold", [True, "all"])
def test_only_the_norms_that_feed_linears_write_permuted_outputs(fold, tokenizer, ids):
    dense = _gemma3(tokenizer)
    model = copy.deepcopy(dense)
    _prune(model, tokenizer, metric="wanda", permutation="heuristic", fold_permutations=fold)
    wrapped = {name: m for name, m in model.named_modules() if isinstance(m, PermutedOutputNorm)}
    layers = range(model.config.num_hidden_layers)
    assert {name: set(m.readers) for name, m in wrapped.items()} == {
        **{f"model.layers.{i}.input_layernorm": {f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv"}
           for i in layers},
        **{f"model.layers.{i}.pre_feedforward_layernorm": {f"model.layers.{i}.mlp.gate_proj",
                                                           f"model.layers.{i}.mlp.up_proj"} for i in layers},
    }
    x = torch.randn(3, 5, model.config.hidden_size)
    for name, norm in wrapped.items():  # Gemma's (1 + w), the weight kept in channel order, then the gather
        assert norm.kind == "rms_one_plus" and not is_identity(norm.output_perm)
        assert torch.equal(norm(x), dense.get_submodule(name)(x)[..., norm.output_perm])
    kept = {name: m for name, m in _norms(model).items() if name not in wrapped}
    assert len(kept) == 4 * model.config.num_hidden_layers + 1  # q/k norms, post-attention/-feedforward, final
    for name, norm in kept.items():  # the norms after o_proj, down_proj, q_proj and k_proj are untouched
        assert torch.equal(norm.weight, dense.get_submodule(name).weight), name


def _attention_outputs(model, ids):
    """Outputs of every layer's k_proj and v_proj on the model's own inputs."""
    outputs, handles = {}, []
    for name, module in model.named_modules():
        if name.endswith(("k_proj", "v_proj")):
            handles.append(module.register_forward_hook(lambda mod, args, out, name=name: outputs.update({name: out})))
    _logits(model, ids)
    for handle in handles:
        handle.remove()
    return outputs


def test_head_shaped_attention_permutation_folds_into_v_proj_not_into_the_normalised_k_proj(tokenizer, ids,
                                                                                          monkeypatch):
    folded, unfolded = _gemma3(tokenizer), _gemma3(tokenizer)
    _prune(folded, tokenizer, metric="wanda", permutation="heuristic", fold_permutations="all")
    monkeypatch.setattr("optimum_permllm.pipeline.folding.fold_layer_permutations", lambda *args, **kwargs: [])
    _prune(unfolded, tokenizer, metric="wanda", permutation="heuristic", fold_permutations="all")  # same choices
    torch.testing.assert_close(_logits(folded, ids), _logits(unfolded, ids), rtol=1e-5, atol=1e-5)
    assert all(m.has_identity_perm() for m in folded.modules() if isinstance(m, PermutedSparseLinear))
    after, before = _attention_outputs(folded, ids), _attention_outputs(unfolded, ids)
    for layer in range(folded.config.num_hidden_layers):
        attention = f"model.layers.{layer}.self_attn"
        o_perm = unfolded.get_submodule(f"{attention}.o_proj").input_perm
        head_dim = folded.config.head_dim
        assert o_perm.numel() == folded.config.num_attention_heads * head_dim != folded.config.hidden_size
        assert not is_identity(o_perm)
        # one KV head: v_proj's rows take o_proj's permutation of the first query head's channels
        v_rows = o_perm[:head_dim]
        torch.testing.assert_close(after[f"{attention}.v_proj"], before[f"{attention}.v_proj"][..., v_rows])
        # k_norm reads these rows: same order (float32 sums over the input in another order: a few ulps apart)
        torch.testing.assert_close(after[f"{attention}.k_proj"], before[f"{attention}.k_proj"], rtol=1e-5, atol=1e-6)


def _dense_with_merged_weights(peft_model):
    """Reference: the model with each sparse linear replaced by a dense nn.Linear holding
    mask(W + B A * scaling) in the layer's own input order (the masked merge, computed densely)."""
    reference = copy.deepcopy(peft_model.get_base_model())
    for name, module in list(reference.named_modules()):
        if isinstance(module, PermutedSparseLoraLinear):
            base = module.get_base_layer()
            kept = base.permuted_mask()[:, torch.argsort(base.input_perm)]
            delta = module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]
            set_submodule(reference, name, _dense_linear((base.dense_weight() + delta).masked_fill(~kept, 0), base.bias))
        elif isinstance(module, PermutedSparseLinear):
            set_submodule(reference, name, _dense_linear(module.dense_weight(), module.bias))
    return reference


def _dense_linear(weight, bias):
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight.data = weight.detach().clone()
    if bias is not None:
        linear.bias.data = bias.detach().clone()
    return linear


def test_lora_on_every_projection_merges_into_the_pattern_and_round_trips(tokenizer, ids, tmp_path):
    model = _gemma3(tokenizer)
    _prune(model, tokenizer, metric="sparsegpt", permutation="heuristic")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    assert sum(isinstance(m, PermutedSparseLoraLinear) for m in peft_model.modules()) == 14
    expected = _logits(_dense_with_merged_weights(peft_model), ids)
    merged = peft_model.merge_and_unload()
    sparse = [m for m in merged.modules() if isinstance(m, PermutedSparseLinear)]
    assert len(sparse) == 14 and all(check_nm(m.permuted_dense_weight(), 2, 4) for m in sparse)
    reference = _logits(merged, ids)
    torch.testing.assert_close(reference, expected, rtol=1e-4, atol=1e-5)
    merged.save_pretrained(tmp_path)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path), ids), reference)
