"""from_pretrained(dense, quantization_config=PermLLMConfig(...)) prunes on load; the sparsifier in memory."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_permllm import PermLLMConfig, PermLLMSparsifier, PermutedSparseLinear
from optimum_permllm.nn.permuted_norm import PermutedOutputNorm
from optimum_permllm.sparse import check_nm, is_identity

from ..data.tiny_text import SENTENCES
from ..conftest import save_tiny_dense, tiny_model

TEXT = [" ".join(SENTENCES) * 4] * 8


def _dense_checkpoint(tmp_path):
    return tmp_path / "dense", save_tiny_dense(tmp_path / "dense")


def test_prune_on_load_with_calibration_then_save_and_reload(tmp_path):
    path, tokenizer = _dense_checkpoint(tmp_path)
    config = PermLLMConfig(metric="wanda", permutation="heuristic", dataset=TEXT, num_samples=4, seq_len=32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config)
    sparse = [m for m in model.modules() if isinstance(m, PermutedSparseLinear)]
    assert len(sparse) == 14 and all(check_nm(m.permuted_dense_weight(), 2, 4) for m in sparse)
    # every permutation is folded (norms write permuted outputs, v_proj/gate/up rows are reordered)
    norms = [m for m in model.modules() if isinstance(m, PermutedOutputNorm)]
    assert norms and all(not is_identity(m.output_perm) for m in norms)
    ids = tokenizer(SENTENCES[0], return_tensors="pt").input_ids
    reference = model(ids).logits
    model.save_pretrained(tmp_path / "sparse")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sparse")
    assert torch.equal(loaded(ids).logits, reference)
    assert loaded.config.quantization_config.metric == "wanda"


def test_sparsifier_in_memory_matches_prune_on_load(tmp_path):
    path, tokenizer = _dense_checkpoint(tmp_path)
    config = dict(metric="sparsegpt", permutation="heuristic", dataset=TEXT, num_samples=4, seq_len=32)
    on_load = AutoModelForCausalLM.from_pretrained(path, quantization_config=PermLLMConfig(**config))
    in_memory = AutoModelForCausalLM.from_pretrained(path)
    PermLLMSparsifier(PermLLMConfig(**config)).sparsify_model(in_memory, tokenizer, progress=False)
    ids = tokenizer(SENTENCES[1], return_tensors="pt").input_ids
    assert torch.equal(on_load(ids).logits, in_memory(ids).logits)


def test_calibration_without_any_tokenizer_is_a_clear_error():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="tokenizer"):
        PermLLMSparsifier(PermLLMConfig(metric="wanda")).sparsify_model(model)


def test_too_little_calibration_text_is_a_clear_error(tmp_path):
    path, tokenizer = _dense_checkpoint(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(ValueError, match="tokens"):
        PermLLMSparsifier(PermLLMConfig(dataset=["too short"], seq_len=64, num_samples=2)).sparsify_model(model, tokenizer)


def test_checkpoint_records_the_readers_of_permuted_norms_so_dequantize_needs_no_probe(tmp_path, monkeypatch):
    import json

    from optimum_permllm.pipeline import folding, norm_readers

    path, tokenizer = _dense_checkpoint(tmp_path)
    config = PermLLMConfig(metric="wanda", permutation="heuristic", dataset=TEXT, num_samples=4, seq_len=32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config)
    ids = tokenizer(SENTENCES[2], return_tensors="pt").input_ids
    with torch.no_grad():  # the reference: which linears the probe forward finds reading each norm
        probed = folding.norm_consumers(model, lambda: model(input_ids=ids, use_cache=False))
        reference = model(ids).logits
    model.save_pretrained(tmp_path / "sparse")
    recorded = json.loads((tmp_path / "sparse" / "config.json").read_text())["quantization_config"]["permuted_norms"]
    assert recorded and recorded == {name: readers for name, readers in probed.items() if name in recorded}
    assert set(recorded) == {n for n, m in model.named_modules() if isinstance(m, PermutedOutputNorm)}

    def no_probe(*args, **kwargs):
        raise AssertionError("dequantize ran a probe forward although the readers are recorded")

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sparse")  # loading checks the record with a probe
    monkeypatch.setattr(folding, "norm_consumers", no_probe)
    monkeypatch.setattr(norm_readers, "probe_norm_readers", no_probe)
    dense = loaded.dequantize()
    assert not any(isinstance(m, (PermutedOutputNorm, PermutedSparseLinear)) for m in dense.modules())
    torch.testing.assert_close(dense(ids).logits, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("metric, permutation", [("magnitude", "none"), ("wanda", "heuristic")])
def test_sparsifying_a_sparse_model_says_it_is_already_pruned_and_how_to_prune_again(metric, permutation, tmp_path):
    path, tokenizer = _dense_checkpoint(tmp_path)
    config = dict(metric=metric, permutation=permutation, dataset=TEXT, num_samples=4, seq_len=32)
    model = AutoModelForCausalLM.from_pretrained(path)
    PermLLMSparsifier(PermLLMConfig(**config)).sparsify_model(model, tokenizer, progress=False)
    model.save_pretrained(tmp_path / "sparse")
    for sparse in (model, AutoModelForCausalLM.from_pretrained(tmp_path / "sparse")):
        before = {k: v.clone() for k, v in sparse.state_dict().items()}
        with pytest.raises(ValueError, match=r"already pruned: it has 14 sparse layers.*dequantize\(\)"):
            PermLLMSparsifier(PermLLMConfig(**config)).sparsify_model(sparse, tokenizer, progress=False)
        assert all(torch.equal(sparse.state_dict()[k], v) for k, v in before.items())
    # what the message says works: dequantize, then prune again
    again = PermLLMSparsifier(PermLLMConfig(**config)).sparsify_model(model.dequantize(), tokenizer, progress=False)
    assert sum(isinstance(m, PermutedSparseLinear) for m in again.modules()) == 14
