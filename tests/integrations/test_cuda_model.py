"""A whole fp16/bf16 model on the GPU: pruned on the CPU, saved, loaded on CUDA, run through the 2:4 kernel."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_permllm import PermLLMConfig, PermLLMSparsifier, PermutedSparseLinear
from optimum_permllm.nn import cuda_sparse

from ..conftest import tiny_model
from ..data.tiny_text import SENTENCES, tiny_tokenizer

TEXT = [" ".join(SENTENCES) * 4] * 8


def _relative_error(actual, expected):
    return float((actual.double().cpu() - expected).norm() / expected.norm())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_checkpoint_saved_on_the_cpu_runs_on_cuda_through_the_kernel(dtype, tmp_path, kernel_calls, monkeypatch):
    """Wanda + heuristic permutation (folded into the norms, so the Triton norm runs too; o_proj keeps its
    gather), saved on the CPU and loaded on CUDA: every sparse linear runs the 2:4 kernel on 4 x 32 tokens,
    and the logits match the float64 dense masked reference as closely as the same model's dense masked
    path on the GPU does (at most twice its error plus two unit roundoffs: both round every layer's output
    to the dtype after fp32 accumulation)."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("compute capability < 8.0 has no sparse tensor cores")
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", vocab=len(tokenizer), dtype=dtype)
    config = PermLLMConfig(metric="wanda", permutation="heuristic", dataset=TEXT, num_samples=4, seq_len=32)
    PermLLMSparsifier(config).sparsify_model(model, tokenizer, progress=False)
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, len(tokenizer), (4, 32), generator=torch.Generator().manual_seed(3))

    reference_model = AutoModelForCausalLM.from_pretrained(tmp_path).to(torch.float64)
    with torch.no_grad():
        reference = reference_model(ids).logits
    on_gpu = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype, device_map="cuda")
    sparse = [m for m in on_gpu.modules() if isinstance(m, PermutedSparseLinear)]
    assert len(sparse) == 14 and all(m.weight.is_cuda and m.weight.dtype == dtype for m in sparse)
    with torch.no_grad():
        through_kernel = on_gpu(ids.cuda()).logits
    assert set(kernel_calls) == set(sparse), "a sparse linear did not run the 2:4 kernel"
    monkeypatch.setattr(cuda_sparse, "min_tokens_for", lambda out_features, in_features: 10**9)
    with torch.no_grad():
        through_dense_path = on_gpu(ids.cuda()).logits
    assert sum(map(len, kernel_calls.values())) == len(sparse)  # the second run stayed on the dense path

    kernel_error = _relative_error(through_kernel, reference)
    dense_error = _relative_error(through_dense_path, reference)
    unit_roundoff = torch.finfo(dtype).eps / 2
    assert kernel_error <= 2 * dense_error + 2 * unit_roundoff, (kernel_error, dense_error)
