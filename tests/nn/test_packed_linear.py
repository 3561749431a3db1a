"""packed_linear: x @ W.T from the packed form, against F.linear with the dense masked weight."""

import pytest
import torch
import torch.nn.functional as F

from optimum_permllm.nn import packed_linear as packed
from optimum_permllm.nn import PermutedSparseLinear
from optimum_permllm.sparse.nm import nm_mask, pack_nm


@pytest.mark.parametrize("n,m,bias", [(2, 4, True), (4, 8, False), (1, 4, True)])
def test_reference_path_is_bit_exact_with_the_dense_masked_matmul(n, m, bias):
    g = torch.Generator().manual_seed(n * 10 + m)
    weight = torch.randn(12, 32, generator=g)
    weight = weight.masked_fill(~nm_mask(weight.abs(), n, m), 0)
    values, bitmask = pack_nm(weight, n, m, mask=weight != 0)
    b = torch.randn(12, generator=g) if bias else None
    x = torch.randn(3, 5, 32, generator=g)
    assert torch.equal(packed.packed_linear(x, values, bitmask, b, 32, n, m), F.linear(x, weight, b))


def test_triton_serves_only_few_token_2_4_calls_on_cuda_without_autograd(monkeypatch):
    values, bitmask = torch.zeros(8, 16), torch.zeros(8, 4, dtype=torch.uint8)
    monkeypatch.setattr(packed, "use_triton", lambda *tensors: True)  # stand in for CUDA tensors
    x = torch.zeros(packed.MAX_PACKED_TOKENS, 32)
    assert packed._triton_serves(x, values, bitmask, None, 2, 4)
    assert not packed._triton_serves(torch.zeros(packed.MAX_PACKED_TOKENS + 1, 32), values, bitmask, None, 2, 4)
    assert not packed._triton_serves(x, values, bitmask, None, 4, 8)
    assert not packed._triton_serves(x.half(), values, bitmask, None, 2, 4)  # x and weight dtypes differ
    assert not packed._triton_serves(x, values, bitmask, torch.zeros(8).half(), 2, 4)
    monkeypatch.setattr(packed, "use_triton", lambda *tensors: False)  # CPU tensors or autograd recording
    assert not packed._triton_serves(x, values, bitmask, None, 2, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_decode_runs_from_the_packed_form_and_keeps_no_dense_copy(dtype):
    """A 2:4 layer on CUDA at decode sizes matches the dense masked reference and holds no unpacked weight."""
    torch.manual_seed(7)
    linear = torch.nn.Linear(512, 256).to("cuda", dtype)
    layer = PermutedSparseLinear.from_linear(linear, perm=torch.randperm(512, device="cuda"))
    with torch.inference_mode():
        for tokens in (1, 4, packed.MAX_PACKED_TOKENS):
            x = torch.randn(tokens, 512, device="cuda", dtype=dtype)
            reference = F.linear(x.double()[:, layer.input_perm], layer.permuted_dense_weight().double(),
                                 linear.bias.double())
            y = layer(x)
            error = float((y.double() - reference).norm() / reference.norm())
            assert error < {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert layer._dense is None
