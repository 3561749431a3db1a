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


# The demo's calibration (16 x 512 tokens), not a tiny one: with fewer than 4 tokens per input (6144 for
# down_proj's 1536) lsq raises its damping and warns, a regime the demo never runs. To save time only the first
# LSQ_LAYERS decoder layers are pruned (the others kept dense through modules_to_not_convert): 17 min for the
# test on the shared 2-core CPU at load 7.
LSQ_LAYERS = 4


def test_the_demos_default_method_saves_reloads_bit_exact_and_beats_sparsegpt_on_the_calibration_data(smollm2, tmp_path):
    from optimum_permllm import save_pretrained
    from optimum_permllm.commands import demo
    from optimum_permllm.data.calibration import get_calibration_data

    defaults = demo.build_parser().parse_args([])
    assert (defaults.metric, defaults.permutation) == ("lsq", "heuristic")  # the configuration tested here
    folder, tokenizer = smollm2
    budget = demo.DEMO_CALIBRATION  # 16 x 512 tokens of the offline Wikipedia calibration text
    settings = dict(permutation=defaults.permutation, dataset=None, **budget,
                    modules_to_not_convert=[f"model.layers.{i}" for i in range(LSQ_LAYERS, 30)])
    ids = get_calibration_data(None, tokenizer, budget["num_samples"], budget["seq_len"], 0)  # what the prune sees
    dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        dense_output = dense.model(ids).last_hidden_state  # the last hidden states, without 8192 x 49152 logits
    errors = {}
    for metric in ("sparsegpt", "lsq"):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        PermLLMSparsifier(PermLLMConfig(metric=metric, **settings)).sparsify_model(model, tokenizer, progress=False)
        with torch.no_grad():
            output = model.model(ids).last_hidden_state
        errors[metric] = float((output - dense_output).square().sum() / dense_output.square().sum())
    sparse = [m for m in model.modules() if isinstance(m, PermutedSparseLinear)]
    assert len(sparse) == LSQ_LAYERS * 7 and all(check_nm(m.permuted_dense_weight(), 2, 4) for m in sparse)
    # lsq refits each row's kept weights by least squares on the calibration inputs, SparseGPT column by column.
    assert errors["lsq"] <= errors["sparsegpt"]

    save_pretrained(model, tmp_path / "sparse", tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sparse", dtype=torch.float32)
    state, again = model.state_dict(), reloaded.state_dict()
    bits = lambda t: t.view(torch.uint8) if t.is_floating_point() else t  # noqa: E731  (-0.0 is not 0.0)
    assert state.keys() == again.keys() and all(torch.equal(bits(state[k]), bits(again[k])) for k in state)
    with torch.no_grad():
        assert torch.equal(reloaded(ids[:2]).logits, model(ids[:2]).logits)
