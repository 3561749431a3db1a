"""A damaged or inconsistent permllm checkpoint is refused at load, naming the module and the tensor."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from optimum_permllm import PermLLMConfig, PermLLMSparsifier, PermutedSparseLinear
from optimum_permllm.nn.validation import CheckpointError, sparse_module_problems
from optimum_permllm.sparse import nm_mask, pack_bits

from ..conftest import tiny_model
from ..data.tiny_text import SENTENCES, tiny_tokenizer

TEXT = [" ".join(SENTENCES) * 4] * 8
LAYER = "model.layers.0.mlp.down_proj"
NORM = "model.layers.0.input_layernorm"


@pytest.fixture(scope="module")
def folded_dir(tmp_path_factory):
    """A tiny LLaMA pruned by the sparsifier with folded heuristic permutations (permuted norms), saved."""
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", vocab=len(tokenizer))
    config = PermLLMConfig(metric="wanda", permutation="heuristic", dataset=TEXT, num_samples=4, seq_len=32)
    PermLLMSparsifier(config).sparsify_model(model, tokenizer, progress=False)
    folder = tmp_path_factory.mktemp("folded")
    model.save_pretrained(folder)
    return folder


def _copy(source, target):
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def _edit_tensors(folder, edit):
    """Rewrite the checkpoint's safetensors file with `edit(tensors)` applied."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"].update(changes)
    path.write_text(json.dumps(config))


def _refused(folder, *needles):
    with pytest.raises(ValueError) as info:
        AutoModelForCausalLM.from_pretrained(folder)
    for needle in needles:
        assert needle in str(info.value)
    return info.value


def test_sparsifier_records_the_permuted_norms(folded_dir):
    config = json.loads((folded_dir / "config.json").read_text())["quantization_config"]
    assert NORM in config["permuted_norms"] and len(config["permuted_norms"]) == 4


def test_valid_checkpoint_has_no_problems(folded_dir):
    assert sparse_module_problems(AutoModelForCausalLM.from_pretrained(folded_dir)) == []


def test_duplicate_input_perm_index_is_refused(folded_dir, tmp_path):
    def duplicate(tensors):
        tensors[f"{LAYER}.input_perm"][1] = tensors[f"{LAYER}.input_perm"][0]

    _edit_tensors(_copy(folded_dir, tmp_path), duplicate)
    error = _refused(tmp_path, f"{LAYER}.input_perm", "not a bijection")
    assert isinstance(error, CheckpointError) and len(error.problems) == 1


def test_out_of_range_input_perm_is_refused(folded_dir, tmp_path):
    def out_of_range(tensors):
        tensors[f"{LAYER}.input_perm"][3] = 10_000

    _edit_tensors(_copy(folded_dir, tmp_path), out_of_range)
    _refused(tmp_path, f"{LAYER}.input_perm", "outside [0, 128)")


def test_missing_norm_output_perm_is_refused(folded_dir, tmp_path):
    _edit_tensors(_copy(folded_dir, tmp_path), lambda tensors: tensors.pop(f"{NORM}.output_perm"))
    _refused(tmp_path, f"{NORM}.output_perm", "missing")


@pytest.fixture(scope="module")
def biased_dirs(tmp_path_factory):
    """Qwen2 (q/k/v biases, RMSNorm) and OPT (biases, LayerNorm) pruned with folded permutations, saved."""
    tokenizer = tiny_tokenizer()
    folders = {}
    for family in ("qwen2", "opt"):
        model = tiny_model(family, vocab=len(tokenizer))
        config = PermLLMConfig(metric="wanda", permutation="heuristic", dataset=TEXT, num_samples=4, seq_len=32)
        PermLLMSparsifier(config).sparsify_model(model, tokenizer, progress=False)
        folders[family] = tmp_path_factory.mktemp(family)
        model.save_pretrained(folders[family])
    return folders


@pytest.mark.parametrize("family, tensor", [
    ("qwen2", "model.layers.0.self_attn.q_proj.bias"),
    ("qwen2", "model.layers.1.input_layernorm.weight"),
    ("opt", "model.decoder.layers.0.fc2.bias"),
    ("opt", "model.decoder.layers.1.self_attn_layer_norm.bias"),
    ("opt", "model.decoder.layers.0.final_layer_norm.weight"),
])
def test_a_missing_bias_or_permuted_norm_tensor_is_refused(biased_dirs, family, tensor, tmp_path):
    """Missing tensors of sparse layers and permuted norms are an error, never zeros or uninitialised memory."""
    config = json.loads((biased_dirs[family] / "config.json").read_text())["quantization_config"]
    owner = tensor.rpartition(".")[0]
    assert owner in config["converted_modules"] or owner in config["permuted_norms"]
    _edit_tensors(_copy(biased_dirs[family], tmp_path), lambda tensors: tensors.pop(tensor))
    _refused(tmp_path, tensor, "missing")


def test_duplicate_norm_output_perm_index_is_refused(folded_dir, tmp_path):
    def duplicate(tensors):
        tensors[f"{NORM}.output_perm"][5] = tensors[f"{NORM}.output_perm"][6]

    _edit_tensors(_copy(folded_dir, tmp_path), duplicate)
    _refused(tmp_path, f"{NORM}.output_perm", "not a bijection")


def _readers(folder) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]["permuted_norms"]


@pytest.mark.parametrize("other", ["model.layers.0.post_attention_layernorm", "model.layers.1.input_layernorm"])
def test_swapped_readers_of_permuted_norms_are_refused(folded_dir, other, tmp_path):
    """Swapped records keep the sparse model right but would give the permutations to the wrong linears at
    dense export; they are checked against the linears that read each norm in this model."""
    readers = _readers(_copy(folded_dir, tmp_path))
    assert readers[NORM] != readers[other]
    _edit_config(tmp_path, permuted_norms={**readers, NORM: readers[other], other: readers[NORM]})
    error = _refused(tmp_path, "permuted_norms", "does not match the model")
    assert len(error.problems) == 2
    assert all(name in " ".join(error.problems) for name in (NORM, other, *readers[NORM], *readers[other]))


def test_a_reader_left_out_of_the_record_is_refused(folded_dir, tmp_path):
    readers = _readers(_copy(folded_dir, tmp_path))
    _edit_config(tmp_path, permuted_norms={**readers, NORM: readers[NORM][:-1]})
    _refused(tmp_path, f"permuted_norms[{NORM!r}]", readers[NORM][-1])


def test_a_checkpoint_without_recorded_readers_finds_them_and_dequantizes_exactly(folded_dir, tmp_path):
    """Checkpoints written before the readers were recorded list only the norms' names."""
    readers = _readers(_copy(folded_dir, tmp_path))
    _edit_config(tmp_path, permuted_norms=sorted(readers))
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    sparse = AutoModelForCausalLM.from_pretrained(folded_dir)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert {n: list(m.readers) for n, m in loaded.named_modules() if hasattr(m, "output_perm")} == readers
    with torch.no_grad():
        torch.testing.assert_close(loaded.dequantize()(ids).logits, sparse(ids).logits, rtol=1e-4, atol=1e-5)


def test_mask_that_is_not_n_m_is_refused(folded_dir, tmp_path):
    """Four kept in one group and none in the next: the same number of kept entries, but not 2:4."""
    def unbalance(tensors):
        mask = tensors[f"{LAYER}.weight_mask"]
        mask[0, 0] = 0b00001111  # the first byte holds groups 0 and 1 of row 0
        tensors[f"{LAYER}.weight_mask"] = mask

    _edit_tensors(_copy(folded_dir, tmp_path), unbalance)
    _refused(tmp_path, f"{LAYER}.weight_mask", "not 2:4", "row 0, group 0 keeps 4")


def test_4_8_tensors_declared_2_4_are_refused(tmp_path):
    model = tiny_model("llama")
    PermLLMSparsifier(PermLLMConfig(sparsity="4:8", metric="magnitude", permutation="none")).sparsify_model(model)
    model.save_pretrained(tmp_path)
    _edit_config(tmp_path, sparsity="2:4")
    _refused(tmp_path, "weight_mask", "the mask is 4:8", "config's sparsity does not match")


def test_3_4_declaration_of_2_4_tensors_names_the_sparsity(folded_dir, tmp_path):
    _edit_config(_copy(folded_dir, tmp_path), sparsity="3:4")
    _refused(tmp_path, ".weight has shape", "sparsity='3:4'", "does not match the tensors")


def test_non_finite_packed_values_are_refused(folded_dir, tmp_path):
    def poison(tensors):
        tensors[f"{LAYER}.weight"][0, 0] = float("nan")

    _edit_tensors(_copy(folded_dir, tmp_path), poison)
    _refused(tmp_path, f"{LAYER}.weight has 1 NaN")


def _as_int32_bits(tensors, key):
    """What editing the safetensors header from F32 to I32 does: the same bytes, read as integers."""
    tensors[key] = tensors[key].view(torch.int32)


@pytest.mark.parametrize("tensor", [f"{LAYER}.weight", f"{NORM}.weight"])
def test_float_values_stored_as_integers_are_refused(folded_dir, tensor, tmp_path):
    _edit_tensors(_copy(folded_dir, tmp_path), lambda tensors: _as_int32_bits(tensors, tensor))
    _refused(tmp_path, f"{tensor} is stored as torch.int32", "floating point")


def test_a_bias_stored_as_integers_is_refused(biased_dirs, tmp_path):
    tensor = "model.layers.0.self_attn.k_proj.bias"
    _edit_tensors(_copy(biased_dirs["qwen2"], tmp_path), lambda tensors: _as_int32_bits(tensors, tensor))
    _refused(tmp_path, f"{tensor} is stored as torch.int32", "floating point")


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.uint8])
@pytest.mark.parametrize("tensor", [f"{LAYER}.input_perm", f"{NORM}.output_perm"])
def test_a_permutation_stored_as_another_integer_type_is_refused(folded_dir, tensor, dtype, tmp_path):
    """The format stores permutations as int64; any other dtype is refused, not converted (README)."""
    def narrow(tensors):
        assert int(tensors[tensor].max()) < 256  # the values fit: only the dtype is wrong
        tensors[tensor] = tensors[tensor].to(dtype)

    _edit_tensors(_copy(folded_dir, tmp_path), narrow)
    _refused(tmp_path, f"{tensor} is stored as {dtype}", "torch.int64")


def test_every_problem_is_listed(folded_dir, tmp_path):
    def break_two(tensors):
        for name in (LAYER, "model.layers.1.self_attn.o_proj"):
            perm = tensors[f"{name}.input_perm"]
            perm[1] = perm[0]

    _edit_tensors(_copy(folded_dir, tmp_path), break_two)
    error = _refused(tmp_path, LAYER, "model.layers.1.self_attn.o_proj")
    assert len(error.problems) == 2


def test_semi_structured_path_refuses_a_weight_that_is_not_n_m():
    layer = PermutedSparseLinear.from_linear(torch.nn.Linear(16, 4), 2, 4)
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[:, :8] = True  # 8 kept per row as 2:4 would, but 4 in groups 0-1 and 0 in groups 2-3
    layer.weight_mask.data = pack_bits(mask)
    with pytest.raises(ValueError, match="claims 2:4"):
        layer._checked_nm_weight()
    layer.weight_mask.data = pack_bits(nm_mask(torch.rand(4, 16), 2, 4))
    assert layer._checked_nm_weight().shape == (4, 16)
