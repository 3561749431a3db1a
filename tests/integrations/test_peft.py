"""LoRA on PermutedSparseLinear through PEFT: forward, training, masked merge, adapter I/O, Trainer."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from optimum_permllm import PermLLMConfig, PermLLMSparsifier, PermutedSparseLinear
from optimum_permllm.integrations.peft import PermutedSparseLoraLinear
from optimum_permllm.sparse import check_nm

from ..conftest import tiny_model
from .test_save_load import _ids, _sparsify_with_random_permutations

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _lora(model, init=False, **kwargs):
    """LoRA with random (not zero) B so the adapter changes the output from the start."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init, **kwargs)
    return get_peft_model(model, config)


def _sparse_checkpoint(tmp_path):
    model = _sparsify_with_random_permutations(tiny_model("llama"))
    model.save_pretrained(tmp_path / "sparse")
    return tmp_path / "sparse"


def test_get_peft_model_wraps_sparse_layers_with_no_extra_call():
    peft_model = _lora(_sparsify_with_random_permutations(tiny_model("llama")))
    wrapped = [m for m in peft_model.modules() if isinstance(m, PermutedSparseLoraLinear)]
    assert len(wrapped) == 2 * len(TARGETS)
    assert all(isinstance(m.get_base_layer(), PermutedSparseLinear) for m in wrapped)


def test_lora_branch_reads_the_original_input_order():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8)
    sparse = PermutedSparseLinear.from_linear(linear, perm=torch.randperm(16))
    model = torch.nn.Sequential(sparse)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights=False))
    layer = peft_model.base_model.model[0]
    x = torch.randn(3, 16)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    reference = x @ sparse.dense_weight().T + sparse.bias + (x @ a.T @ b.T) * 2.0
    torch.testing.assert_close(peft_model(x), reference, rtol=1e-5, atol=1e-5)


def test_training_on_cpu_updates_lora_only_and_lowers_the_loss():
    model = _sparsify_with_random_permutations(tiny_model("llama"))
    peft_model = _lora(model, init=True)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all(p.requires_grad is False for n, p in peft_model.named_parameters() if "lora_" not in n)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = _ids()
    losses = []
    for _ in range(8):
        loss = peft_model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for key, value in model.state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, frozen[key]), key


def _masked_merge_reference(layer: PermutedSparseLoraLinear) -> torch.Tensor:
    """Merged dense weight, computed in the ORIGINAL column order: mask(W + delta), then permuted."""
    base = layer.get_base_layer()
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    original_mask = base.permuted_mask()[:, torch.argsort(base.input_perm)]
    merged = (base.dense_weight() + delta).masked_fill(~original_mask, 0)
    return merged[:, base.input_perm]


def test_merge_adapter_keeps_the_exact_pattern_and_unmerge_restores():
    peft_model = _lora(_sparsify_with_random_permutations(tiny_model("llama")))
    layers = [m for m in peft_model.modules() if isinstance(m, PermutedSparseLoraLinear)]
    before = {id(m): (m.get_base_layer().permuted_dense_weight(), m.get_base_layer().weight_mask.clone()) for m in layers}
    expected = {id(m): _masked_merge_reference(m) for m in layers}
    peft_model.merge_adapter()
    for layer in layers:
        base = layer.get_base_layer()
        assert torch.equal(base.weight_mask, before[id(layer)][1])
        assert check_nm(base.permuted_dense_weight(), 2, 4)
        assert torch.equal(base.permuted_dense_weight().masked_fill(base.permuted_mask(), 0),
                           torch.zeros_like(expected[id(layer)]))
        torch.testing.assert_close(base.permuted_dense_weight(), expected[id(layer)], rtol=1e-6, atol=1e-6)
    peft_model.unmerge_adapter()
    for layer in layers:
        torch.testing.assert_close(layer.get_base_layer().permuted_dense_weight(), before[id(layer)][0],
                                   rtol=1e-6, atol=1e-6)


def test_merged_output_equals_a_dense_model_with_the_masked_update():
    torch.manual_seed(0)
    sparse = PermutedSparseLinear.from_linear(torch.nn.Linear(16, 8), perm=torch.randperm(16))
    peft_model = get_peft_model(torch.nn.Sequential(sparse),
                                LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    layer = peft_model.base_model.model[0]
    expected = _masked_merge_reference(layer)[:, torch.argsort(sparse.input_perm)]
    x = torch.randn(5, 16)
    merged = peft_model.merge_and_unload()[0]
    assert isinstance(merged, PermutedSparseLinear)
    torch.testing.assert_close(merged(x), x @ expected.T + sparse.bias, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_saves_and_loads_as_a_permllm_checkpoint(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(_sparse_checkpoint(tmp_path))
    merged = _lora(model).merge_and_unload()
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    reference = merged(_ids()).logits
    merged.save_pretrained(tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    sparse = [m for m in loaded.modules() if isinstance(m, PermutedSparseLinear)]
    assert len(sparse) == 14 and all(check_nm(m.permuted_dense_weight(), 2, 4) for m in sparse)
    assert torch.equal(loaded(_ids()).logits, reference)


def test_adapter_save_and_peft_from_pretrained_give_identical_logits(tmp_path):
    checkpoint = _sparse_checkpoint(tmp_path)
    peft_model = _lora(AutoModelForCausalLM.from_pretrained(checkpoint))
    reference = peft_model(_ids()).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    restored = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint), tmp_path / "adapter")
    assert sum(isinstance(m, PermutedSparseLoraLinear) for m in restored.modules()) == 2 * len(TARGETS)
    assert torch.equal(restored(_ids()).logits, reference)


def test_a_target_that_is_not_a_linear_is_a_clear_error():
    model = _sparsify_with_random_permutations(tiny_model("llama"))
    with pytest.raises(ValueError, match="only linear layers"):
        get_peft_model(model, LoraConfig(target_modules=["input_layernorm"]))


@pytest.mark.parametrize("option", [{"use_dora": True}, {"lora_bias": True}])
def test_variants_that_need_the_dense_weight_are_refused(option):
    model = _sparsify_with_random_permutations(tiny_model("llama"))
    with pytest.raises(ValueError, match="PermutedSparseLinear"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj"], **option))


def test_safe_merge_refuses_a_broken_adapter():
    peft_model = _lora(_sparsify_with_random_permutations(tiny_model("llama")))
    layer = next(m for m in peft_model.modules() if isinstance(m, PermutedSparseLoraLinear))
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    packed = layer.get_base_layer().weight.clone()
    with pytest.raises(ValueError, match="broken"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, packed) and not layer.merged


def _train_two_steps(peft_model, tmp_path):
    from transformers import Trainer, TrainingArguments

    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))]
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=2, per_device_train_batch_size=2,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    return Trainer(model=peft_model, args=args, train_dataset=rows).train()


def test_transformers_trainer_accepts_a_loaded_sparse_model_with_lora(tmp_path):
    peft_model = _lora(AutoModelForCausalLM.from_pretrained(_sparse_checkpoint(tmp_path)), init=True)
    before = {n: p.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    result = _train_two_steps(peft_model, tmp_path)
    assert result.global_step == 2
    assert any(not torch.equal(p, before[n]) for n, p in peft_model.named_parameters() if p.requires_grad)


def test_transformers_trainer_accepts_a_model_sparsified_in_memory(tmp_path):
    model = tiny_model("llama")
    PermLLMSparsifier(PermLLMConfig(metric="magnitude", permutation="none")).sparsify_model(model)
    assert _train_two_steps(_lora(model, init=True), tmp_path).global_step == 2


@pytest.mark.gpu
def test_lora_gradients_through_the_cuda_sparse_kernel_match_the_dense_path(kernel_calls, monkeypatch):
    """LoRA trains through the 2:4 kernel: both sparse layers run it with a compressed weight (a refusal on a
    card with sparse tensor cores fails), and the gradients equal those of the dense masked path."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("compute capability < 8.0 has no sparse tensor cores")
    from optimum_permllm.nn import cuda_sparse

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128).half().cuda()
    first = PermutedSparseLinear.from_linear(linear, perm=torch.randperm(256, device="cuda"))
    second = PermutedSparseLinear.from_linear(torch.nn.Linear(128, 128).half().cuda())
    model = torch.nn.Sequential(first, second)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(256, 256, device="cuda", dtype=torch.float16)

    def grads(min_tokens):
        peft_model.zero_grad()
        monkeypatch.setattr(cuda_sparse, "min_tokens_for", lambda out_features, in_features: min_tokens)
        peft_model(x).float().square().mean().backward()
        return [p.grad.float().clone() for p in peft_model.parameters() if p.requires_grad]

    through_kernel = grads(1)
    assert set(kernel_calls) == {first, second}, "both sparse layers must run the 2:4 kernel"
    assert max(max(errors) for errors in kernel_calls.values()) < 2e-3  # four fp16 unit roundoffs
    through_dense_path = grads(10**9)
    assert sum(map(len, kernel_calls.values())) == 2  # the reference run stayed on the dense masked path
    for kernel, dense in zip(through_kernel, through_dense_path):
        torch.testing.assert_close(kernel, dense, rtol=2e-2, atol=2e-3)
