"""permuted_norm == norm(x)[..., perm]: the PyTorch path bit-exact with Hugging Face's norms, the Triton
kernel (run in Triton's CPU interpreter) within float tolerance."""

import pytest
import torch
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from optimum_permllm.kernels import permuted_norm
from optimum_permllm.kernels.permuted_norm import permuted_norm_reference

from .interpret import run_interpreted

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Interpreter casts float32 -> bfloat16 by truncation (the GPU rounds to nearest): allow 2 ulps.
TOLERANCE = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# name -> (kind, x shape, dtype of x, dtype of the weight, row-strided view)
CASES = {
    f"{kind}_{label}": (kind, (3, 5, 72), dtype, dtype, False)
    for kind in ("rms", "rms_one_plus", "layer") for label, dtype in DTYPES.items()
}
CASES.update({
    "rms_bf16_fp32_weight": ("rms", (4, 64), torch.bfloat16, torch.float32, False),
    "rms_wider_than_one_block": ("rms", (2, 4100), torch.float16, torch.float16, False),
    "layer_wider_than_one_block": ("layer", (2, 4100), torch.float32, torch.float32, False),
    "layer_row_strided": ("layer", (6, 48), torch.float16, torch.float16, True),
    "rms_single_token": ("rms", (1, 1, 4096), torch.bfloat16, torch.bfloat16, False),
})



def make_case(name):
    """(x, weight, bias, perm, eps, kind) of a case, deterministic."""
    kind, shape, dtype, weight_dtype, strided = CASES[name]
    g = torch.Generator().manual_seed(len(name))
    width = shape[-1]
    x = (torch.randn(*shape[:-1], width + 16 * strided, generator=g) * 3 + 0.5).to(dtype)[..., :width]
    weight = (torch.randn(width, generator=g) * 0.5 + 1).to(weight_dtype)
    bias = torch.randn(width, generator=g).to(weight_dtype) if kind == "layer" else None
    return x, weight, bias, torch.randperm(width, generator=g), 1e-5, kind


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    cases = {name: make_case(name) for name in CASES}
    return run_interpreted("optimum_permllm.kernels.triton_norm:permuted_norm_triton",
                           cases, tmp_path_factory.mktemp("norm"))


# ----------------------------------------------------------------------------- PyTorch path
@pytest.mark.parametrize("dtype", list(DTYPES.values()))
def test_reference_is_bit_exact_with_hugging_face_norms(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32).to(dtype)
    perm = torch.randperm(32)
    llama, gemma, layer = LlamaRMSNorm(32, eps=1e-6), GemmaRMSNorm(32, eps=1e-6), nn.LayerNorm(32, eps=1e-5)
    with torch.no_grad():
        for module in (llama, gemma, layer):
            module.to(dtype)
            for param in module.parameters():
                param.normal_()
    cases = [(llama, llama.weight, None, 1e-6, "rms"), (gemma, gemma.weight, None, 1e-6, "rms_one_plus"),
             (layer, layer.weight, layer.bias, 1e-5, "layer")]
    with torch.no_grad():
        for module, weight, bias, eps, kind in cases:
            expected = module(x).index_select(-1, perm)
            assert torch.equal(permuted_norm(x, weight, bias, perm, eps, kind), expected), kind


def test_hand_computed_rms_case():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # mean square 7.5
    weight = torch.tensor([1.0, 10.0, 100.0, 1000.0])
    perm = torch.tensor([3, 2, 1, 0])
    scale = 1 / 7.5 ** 0.5
    expected = torch.tensor([[4000 * scale, 300 * scale, 20 * scale, 1 * scale]])
    torch.testing.assert_close(permuted_norm(x, weight, None, perm, 0.0, "rms"), expected)
    torch.testing.assert_close(permuted_norm(x, weight, None, perm, 0.0, "rms_one_plus"),
                               expected * torch.tensor([1001 / 1000, 101 / 100, 11 / 10, 2 / 1]))


def test_hand_computed_layer_norm_case():
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0]])  # mean 3, variance 3.5
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0])
    out = permuted_norm(x, None, bias, torch.tensor([3, 0, 1, 2]), 0.0, "layer")
    torch.testing.assert_close(out, torch.tensor([[3 / 3.5 ** 0.5 + 10, -2 / 3.5 ** 0.5, -1 / 3.5 ** 0.5, 0.0]]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="batch"), "Unknown norm kind"),
    (dict(kind="rms_one_plus", weight=None), "needs a weight"),
    (dict(kind="rms", bias=torch.ones(8)), "has no bias"),
    (dict(kind="layer", weight=torch.ones(7)), "shape \\(8,\\)"),
])
def test_bad_arguments_are_refused(kwargs, message):
    args = dict(x=torch.randn(2, 8), weight=torch.ones(8), bias=None, perm=torch.arange(8), eps=1e-6)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        permuted_norm(**args)


def test_reference_is_differentiable():
    x = torch.randn(3, 16, requires_grad=True)
    weight = torch.randn(16)
    perm = torch.randperm(16)
    permuted_norm(x, weight, None, perm, 1e-6, "rms").sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    (weight * (x_ref * torch.rsqrt(x_ref.pow(2).mean(-1, keepdim=True) + 1e-6))).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


# ----------------------------------------------------------------------------- Triton kernel
@pytest.mark.parametrize("name", list(CASES))
def test_triton_interpreter_matches_reference(interpreted, name):
    x, weight, bias, perm, eps, kind = make_case(name)
    expected = permuted_norm_reference(x, weight, bias, perm, eps, kind)
    out = interpreted[name]
    assert out.dtype == expected.dtype and out.shape == expected.shape
    rtol = max(TOLERANCE[out.dtype], TOLERANCE[x.dtype])  # LLaMA rounds to x.dtype mid-way
    torch.testing.assert_close(out.double(), expected.double(), rtol=rtol, atol=rtol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(CASES))
def test_triton_on_gpu_matches_reference(name):
    pytest.importorskip("triton")
    x, weight, bias, perm, eps, kind = (t.cuda() if isinstance(t, torch.Tensor) else t for t in make_case(name))
    expected = permuted_norm_reference(x, weight, bias, perm, eps, kind)
    out = permuted_norm(x, weight, bias, perm, eps, kind)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    rtol = max(TOLERANCE[out.dtype], TOLERANCE[x.dtype]) / 2  # the GPU rounds to nearest, so one ulp each way
    torch.testing.assert_close(out.double(), expected.double(), rtol=rtol, atol=rtol)
