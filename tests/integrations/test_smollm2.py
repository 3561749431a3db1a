"""The real SmolLM2-135M (from PyPI): calibrated pruning, save, reload bit-exact, dense export.

Marked slow (left out of CI: `bash scripts/test.sh -m slow` runs it): loading and pruning the real model
takes about a minute on a 2-core CPU even with a tiny calibration budget. The accuracy figures come from
benchmarks/, not from here.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_permllm import PermLLMConfig, PermLLMSparsifier, PermutedSparseLinear
from optimum_permllm.nn.permuted_norm import PermutedOutputNorm
from optimum_permllm.sparse import check_nm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from optimum_permllm.data import smollm2_model_dir

    folder = smollm2_model_dir()
    return folder, AutoTokenizer.from_pretrained(folder)


def test_wanda_heuristic_prune_save_reload_and_export(smollm2, tmp_path):
    folder, tokenizer = smollm2
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = PermLLMConfig(metric="wanda", permutation="heuristic", num_samples=2, seq_len=64)
    PermLLMSparsifier(config).sparsify_model(model, tokenizer, progress=False)
    sparse = [m for m in model.modules() if isinstance(m, PermutedSparseLinear)]
    assert len(sparse) == 30 * 7
    assert all(check_nm(m.permuted_dense_weight(), 2, 4) for m in sparse)
    assert sum(isinstance(m, PermutedOutputNorm) for m in model.modules()) == 60
    ids = tokenizer("The history of the city begins", return_tensors="pt").input_ids
    with torch.no_grad():
        reference = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference)
        dense = loaded.dequantize()
        torch.testing.assert_close(dense(ids).logits, reference, rtol=1e-4, atol=1e-4)
    generated = dense.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 5
