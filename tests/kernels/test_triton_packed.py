"""The packed 2:4 kernel (x @ W.T read from values + bitmask) against the dense masked matmul: in Triton's
CPU interpreter everywhere, on the GPU where there is one."""

import pytest
import torch
import torch.nn.functional as F

from optimum_permllm.sparse.nm import nm_mask, pack_nm

from .interpret import run_interpreted

# name -> (out_features, in_features, tokens, dtype, bias, column-strided x)
CASES = {
    "fp32_bias": (40, 72, 3, torch.float32, True, False),
    "fp16_wide_in_not_multiple_of_8": (33, 4100, 2, torch.float16, True, False),
    "bf16_single_token_no_bias": (16, 264, 1, torch.bfloat16, False, False),
    "fp16_strided_rows": (24, 96, 5, torch.float16, False, True),
    "fp16_tokens_over_one_block": (20, 64, 19, torch.float16, True, False),
}
# fp32 accumulation in another order than the reference: a few units of the output dtype's roundoff.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_case(name, device="cpu"):
    """(x, values, bitmask, bias) and the dense masked reference in float64, deterministic."""
    out_f, in_f, tokens, dtype, with_bias, strided = CASES[name]
    g = torch.Generator().manual_seed(len(name))
    weight = torch.randn(out_f, in_f, generator=g)
    weight = weight.masked_fill(~nm_mask(weight.abs(), 2, 4), 0).to(dtype)
    values, bitmask = pack_nm(weight, 2, 4, mask=weight != 0)
    x = torch.randn(tokens, in_f + 8 * strided, generator=g).to(dtype)[:, :in_f]
    bias = torch.randn(out_f, generator=g).to(dtype) if with_bias else None
    reference = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    moved = [t if t is None else t.to(device) for t in (x, values, bitmask, bias)]
    return moved, reference


def relative_error(actual, expected):
    return float((actual.double().cpu() - expected).norm() / expected.norm())


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    cases = {name: make_case(name)[0] for name in CASES}
    return run_interpreted("optimum_permllm.kernels.triton_packed:packed_24_linear_triton", cases,
                           tmp_path_factory.mktemp("packed"))


@pytest.mark.parametrize("name", list(CASES))
def test_triton_interpreter_matches_dense_masked_matmul(interpreted, name):
    (x, *_), reference = make_case(name)
    out = interpreted[name]
    assert out.shape == reference.shape and out.dtype == x.dtype
    assert relative_error(out, reference) < TOLERANCE[x.dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(CASES))
def test_triton_on_gpu_matches_dense_masked_matmul(name):
    from optimum_permllm.kernels.triton_packed import packed_24_linear_triton

    args, reference = make_case(name, "cuda")
    out = packed_24_linear_triton(*args)
    assert out.is_cuda and out.dtype == args[0].dtype
    assert relative_error(out, reference) < TOLERANCE[args[0].dtype]
