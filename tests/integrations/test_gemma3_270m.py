"""The real Gemma 3 270M (from PyPI): every metric with the heuristic permutation, and Wanda with the learned
one, through the public API on 8 x 256 calibration tokens; save, reload bit-exact, dense export.

Marked slow (left out of CI: `bash scripts/test.sh -m slow` runs it): on a 2-core CPU each heuristic case
takes one to a few minutes and the learned one much longer. The accuracy figures come from benchmarks/,
not from here.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_permllm import PermLLMConfig, PermLLMSparsifier, PermutedSparseLinear
from optimum_permllm.nn.permuted_norm import PermutedOutputNorm
from optimum_permllm.sparse import check_nm

pytestmark = pytest.mark.slow

LAYERS, LINEARS_PER_LAYER = 18, 7


@pytest.fixture(scope="module")
def gemma3():
    from optimum_permllm.data import gemma3_model_dir

    folder = gemma3_model_dir()
    return folder, AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("metric, permutation", [
    ("magnitude", "heuristic"), ("wanda", "heuristic"), ("ria", "heuristic"), ("gram", "heuristic"),
    ("sparsegpt", "heuristic"), ("lsq", "heuristic"), ("wanda", "learned"),
])
def test_prune_save_reload_and_export(gemma3, metric, permutation, tmp_path):
    folder, tokenizer = gemma3
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = PermLLMConfig(metric=metric, permutation=permutation, num_samples=8, seq_len=256)
    PermLLMSparsifier(config).sparsify_model(model, tokenizer, progress=False)
    sparse = {name: m for name, m in model.named_modules() if isinstance(m, PermutedSparseLinear)}
    assert len(sparse) == LAYERS * LINEARS_PER_LAYER
    assert all(check_nm(m.permuted_dense_weight(), 2, 4) for m in sparse.values())
    # the norms before attention and MLP write permuted outputs; only o_proj keeps a gather
    assert sum(isinstance(m, PermutedOutputNorm) for m in model.modules()) == 2 * LAYERS
    assert {name.rpartition(".")[2] for name, m in sparse.items() if not m.has_identity_perm()} == {"o_proj"}
    ids = tokenizer("The history of the city of Paris", return_tensors="pt").input_ids
    with torch.no_grad():
        reference = model(ids).logits
    assert torch.isfinite(reference).all()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference)
        dense = loaded.dequantize()
        torch.testing.assert_close(dense(ids).logits, reference, rtol=1e-4, atol=1e-3)
