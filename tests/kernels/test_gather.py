"""gather_columns == x.index_select(-1, perm): the fallback, and the Triton kernel bit for bit."""

import pytest
import torch

from optimum_permllm.kernels import gather_columns
from optimum_permllm.kernels.gather import gather_columns_reference

from .interpret import run_interpreted

# name -> (shape of the base tensor, number of columns actually used, number of indices, dtype)
CASES = {
    "fp32_2d": ((5, 40), 40, 40, torch.float32),
    "bf16_3d": ((2, 3, 24), 24, 24, torch.bfloat16),
    "fp16_many_rows_wide": ((37, 600), 600, 600, torch.float16),
    "subset_with_repeats": ((4, 32), 32, 50, torch.float32),
    "row_strided_view": ((6, 80), 48, 48, torch.float16),
    "single_token": ((1, 4096), 4096, 4096, torch.bfloat16),
}



def make_case(name):
    """The input and index tensor of a case (deterministic)."""
    shape, used, count, dtype = CASES[name]
    g = torch.Generator().manual_seed(len(name))
    x = torch.randn(shape, generator=g).to(dtype)[..., :used]
    if count == used:
        perm = torch.randperm(used, generator=g)
    else:
        perm = torch.randint(0, used, (count,), generator=g)
    return x, perm


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    cases = {name: make_case(name) for name in CASES}
    return run_interpreted("optimum_permllm.kernels.triton_gather:gather_columns_triton",
                           cases, tmp_path_factory.mktemp("gather"))


def test_fallback_on_cpu_is_index_select():
    x = torch.arange(24.0).reshape(2, 3, 4)
    perm = torch.tensor([3, 0, 2, 1])
    expected = torch.tensor([[3.0, 0.0, 2.0, 1.0], [7.0, 4.0, 6.0, 5.0], [11.0, 8.0, 10.0, 9.0]])
    assert torch.equal(gather_columns(x, perm)[0], expected)
    assert torch.equal(gather_columns_reference(x, perm), x[..., perm])


def test_fallback_is_differentiable():
    x = torch.randn(3, 8, requires_grad=True)
    perm = torch.randperm(8)
    gather_columns(x, perm).backward(torch.arange(24.0).reshape(3, 8))
    assert torch.equal(x.grad[:, perm], torch.arange(24.0).reshape(3, 8))


@pytest.mark.parametrize("name", list(CASES))
def test_triton_interpreter_matches_index_select_bit_for_bit(interpreted, name):
    x, perm = make_case(name)
    out = interpreted[name]
    assert out.dtype == x.dtype and out.shape == x.index_select(-1, perm).shape
    assert torch.equal(out, x.index_select(-1, perm))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(CASES))
def test_triton_on_gpu_matches_index_select(name):
    pytest.importorskip("triton")
    x, perm = make_case(name)
    x, perm = x.cuda(), perm.cuda()
    assert torch.equal(gather_columns(x, perm), x.index_select(-1, perm))
