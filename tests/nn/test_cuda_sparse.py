"""The CUDA 2:4 fast path: support rules and padding logic on CPU; the real kernels on a GPU."""

import pytest
import torch
import torch.nn.functional as F
from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

from optimum_permllm.nn import cuda_sparse
from optimum_permllm.nn.cuda_sparse import (
    SemiStructuredMatmul,
    compress_weight,
    layout_reason,
    pad_rows,
    semi_structured_support,
    sparse_linear,
)
from optimum_permllm.sparse.nm import check_nm, nm_mask

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def masked_weight(out_features, in_features, dtype=torch.float32, device="cpu", seed=0):
    """A random 2:4 weight (magnitude mask) with no zero among the kept entries."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g)
    w = w + torch.sign(w) * 0.1  # keep every value away from zero
    return w.masked_fill(~nm_mask(w.abs(), 2, 4), 0).to(device=device, dtype=dtype)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend a CUDA device of a chosen compute capability, with or without cuSPARSELt."""

    def install(capability=(8, 0), cusparselt=True):
        monkeypatch.setattr(cuda_sparse, "_cuda_ready", lambda device: True)
        monkeypatch.setattr(cuda_sparse, "_device_capability", lambda device: capability)
        monkeypatch.setattr(cuda_sparse, "_cusparselt_available", lambda: cusparselt)

    return install


# ----------------------------------------------------------------------------- support rules (CPU)
def test_cpu_device_is_refused():
    reason = semi_structured_support((128, 128), torch.float16, torch.device("cpu"), 2, 4)
    assert reason is not None and "not CUDA" in reason


@pytest.mark.parametrize("n,m", [(4, 8), (1, 4), (2, 8)])
def test_only_2_4_is_supported(n, m, fake_gpu):
    fake_gpu()
    assert "only 2:4" in semi_structured_support((128, 128), torch.float16, "cuda", n, m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8, torch.float64])
def test_bad_dtype_is_refused(dtype, fake_gpu):
    fake_gpu()
    assert "float16/bfloat16" in semi_structured_support((128, 128), dtype, "cuda", 2, 4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_supported_layer_on_ampere_and_hopper(dtype, fake_gpu):
    for capability in [(8, 0), (8, 6), (9, 0)]:
        fake_gpu(capability, cusparselt=True)
        assert semi_structured_support((4096, 11008), dtype, "cuda", 2, 4) is None


def test_old_gpu_is_refused(fake_gpu):
    fake_gpu((7, 5))
    assert "< 8.0" in semi_structured_support((128, 128), torch.float16, "cuda", 2, 4)


def test_hopper_without_cusparselt_is_refused_but_ampere_uses_cutlass(fake_gpu):
    fake_gpu((9, 0), cusparselt=False)
    assert "cuSPARSELt" in semi_structured_support((128, 128), torch.float16, "cuda", 2, 4)
    fake_gpu((8, 0), cusparselt=False)
    assert cuda_sparse.select_backend("cuda") == (SparseSemiStructuredTensorCUTLASS, None)
    assert semi_structured_support((128, 128), torch.float16, "cuda", 2, 4) is None


def test_alignment_follows_the_backend(fake_gpu):
    # cuSPARSELt needs multiples of 16 in fp16; CUTLASS needs 32 rows and 64 columns.
    fake_gpu((8, 0), cusparselt=True)
    assert semi_structured_support((48, 48), torch.float16, "cuda", 2, 4) is None
    assert "multiple of (16, 16)" in semi_structured_support((48, 40), torch.float16, "cuda", 2, 4)
    fake_gpu((8, 0), cusparselt=False)
    assert "multiple of (32, 64)" in semi_structured_support((48, 64), torch.float16, "cuda", 2, 4)
    assert semi_structured_support((64, 128), torch.float16, "cuda", 2, 4) is None


# Minimum (rows, columns) multiples of the sparse operand in fp16 and bf16, written out from PyTorch's own
# tables (torch/sparse/semi_structured.py, `_DTYPE_SHAPE_CONSTRAINTS` of each class: cuSPARSELt
# `_SEMI_STRUCTURED_SPARSE_CONFIG(16, 16, 8, 8)`, CUTLASS `(32, 64, 8, 8)`), not read from the library.
ACCEPTED = {
    SparseSemiStructuredTensorCUSPARSELT: [(16, 16), (48, 32), (4096, 11008)],
    SparseSemiStructuredTensorCUTLASS: [(32, 64), (96, 128), (4096, 11008)],
}
REFUSED = {
    SparseSemiStructuredTensorCUSPARSELT: [(8, 16), (16, 8), (24, 16), (16, 40), (0, 16)],
    SparseSemiStructuredTensorCUTLASS: [(16, 64), (48, 64), (32, 32), (32, 96), (32, 0)],
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", list(ACCEPTED))
def test_layout_reason_follows_the_documented_alignment(backend, dtype):
    for shape in ACCEPTED[backend]:
        assert layout_reason(shape, dtype, backend) is None, shape
    for shape in REFUSED[backend]:
        assert "not a multiple" in layout_reason(shape, dtype, backend), shape
    assert "2-D" in layout_reason((16, 64, 1), dtype, backend)
    assert "float16/bfloat16" in layout_reason((64, 64), torch.float32, backend)


def test_compress_weight_refuses_cpu_with_a_clear_error():
    with pytest.raises(ValueError, match="dense path"):
        compress_weight(masked_weight(32, 64, torch.float16))


# ----------------------------------------------------------------------------- padding logic (CPU)
def test_pad_rows():
    x = torch.arange(12.0).reshape(3, 4)
    padded = pad_rows(x, 8)
    assert padded.shape == (8, 4) and torch.equal(padded[:3], x) and not padded[3:].any()
    assert torch.equal(pad_rows(x, 1), x) and torch.equal(pad_rows(pad_rows(x, 8), 8), padded)


class PaddedDenseKernel:
    """Stands in for the sparse kernel on CPU: checks the token padding, then does a dense F.linear."""

    def __init__(self, multiple):
        self.multiple = multiple
        self.rows_seen = []

    def __call__(self, x2d, weight, bias):
        assert x2d.dim() == 2 and x2d.shape[0] % self.multiple == 0 and x2d.is_contiguous()
        self.rows_seen.append(x2d.shape[0])
        return F.linear(x2d, weight, bias)


@pytest.mark.parametrize("leading", [(5,), (2, 3), (1, 1), (3, 7)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_flattens_pads_and_slices(leading, with_bias, monkeypatch):
    monkeypatch.setattr(cuda_sparse, "token_multiple", lambda compressed: 8)
    weight = masked_weight(24, 16, torch.float64)
    bias = torch.randn(24, dtype=torch.float64) if with_bias else None
    x = torch.randn(*leading, 16, dtype=torch.float64)
    kernel = PaddedDenseKernel(8)
    y = SemiStructuredMatmul.apply(x, weight, lambda: weight, bias, kernel)
    tokens = x.numel() // 16
    assert kernel.rows_seen == [-(-tokens // 8) * 8]
    torch.testing.assert_close(y, F.linear(x, weight, bias), rtol=0, atol=1e-12)


def test_backward_matches_dense_autograd(monkeypatch):
    monkeypatch.setattr(cuda_sparse, "token_multiple", lambda compressed: 8)
    weight = masked_weight(24, 16, torch.float64, seed=1)
    bias = torch.randn(24, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(2, 5, 24, dtype=torch.float64)
    SemiStructuredMatmul.apply(x, weight, lambda: weight, bias, PaddedDenseKernel(8)).backward(grad_y)
    x_ref = x.detach().clone().requires_grad_()
    bias_ref = bias.detach().clone().requires_grad_()
    F.linear(x_ref, weight, bias_ref).backward(grad_y)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(bias.grad, bias_ref.grad, rtol=0, atol=1e-12)


def test_sparse_linear_sparse_path_with_default_kernel_and_backward(monkeypatch):
    # A dense tensor stands in for the compressed one: F.linear (the default kernel) then runs on CPU.
    monkeypatch.setattr(cuda_sparse, "token_multiple", lambda compressed: 16)
    weight = masked_weight(8, 32, torch.float64, seed=4)
    x = torch.randn(3, 3, 32, dtype=torch.float64, requires_grad=True)
    y = sparse_linear(x, weight, lambda: weight, None, min_tokens=1)
    assert y.grad_fn is not None and "SemiStructuredMatmul" in type(y.grad_fn).__name__
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    F.linear(x_ref, weight).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)


def test_sparse_linear_dispatches_on_token_count(monkeypatch):
    calls = []
    monkeypatch.setattr(SemiStructuredMatmul, "apply", lambda *args: calls.append("sparse") or F.linear(
        args[0], args[1], args[3]))
    weight = masked_weight(16, 16)

    def dense_weight():
        calls.append("dense")
        return weight

    sparse_linear(torch.randn(3, 16), weight, dense_weight, None, min_tokens=4)
    sparse_linear(torch.randn(2, 2, 16), weight, dense_weight, None, min_tokens=4)
    sparse_linear(torch.randn(2, 2, 16).half(), weight, dense_weight, None, min_tokens=4)  # dtype mismatch
    assert calls == ["dense", "sparse", "dense"]


def test_measured_shapes_follow_the_table_and_others_the_multiply_add_bound(monkeypatch):
    monkeypatch.setattr(cuda_sparse, "MIN_TOKENS_BY_SHAPE", {(11008, 4096): 512, (4096, 11008): None})
    monkeypatch.setattr(cuda_sparse, "KERNEL_MIN_MACS", 1000)
    assert cuda_sparse.min_tokens_for(11008, 4096) == 512
    assert cuda_sparse.min_tokens_for(10, 10) == 10  # 10 tokens x 10 x 10 = 1000 multiply-adds
    assert cuda_sparse.min_tokens_for(10, 9) == 12  # ceil(1000 / 90)
    assert cuda_sparse.min_tokens_for(100, 100) == 1
    never = cuda_sparse.min_tokens_for(4096, 11008)
    assert never > 10**12
    calls = []
    monkeypatch.setattr(SemiStructuredMatmul, "apply", lambda *args: calls.append("sparse"))
    weight = masked_weight(16, 16)
    sparse_linear(torch.randn(10**4, 16), weight, lambda: calls.append("dense") or weight, None, never)
    assert calls == ["dense"]


def test_the_shipped_dispatch_never_uses_the_kernel_where_it_was_measured_to_lose():
    """The H200 sweep: 4096x4096 lost at every count up to 8192 tokens; the MLP shapes won only from 6144/8192."""
    assert cuda_sparse.min_tokens_for(4096, 4096) > 8192
    assert cuda_sparse.min_tokens_for(11008, 4096) >= 6144 and cuda_sparse.min_tokens_for(4096, 11008) >= 8192
    assert cuda_sparse.min_tokens_for(576, 576) * 576 * 576 >= cuda_sparse.KERNEL_MIN_MACS  # SmolLM2-sized


def test_a_refused_layer_logs_why_it_stays_dense(caplog):
    from optimum_permllm.nn import PermutedSparseLinear

    layer = PermutedSparseLinear.from_linear(torch.nn.Linear(32, 16).half(), 2, 4)
    with caplog.at_level("INFO", logger="optimum_permllm.nn.permuted_sparse_linear"):
        assert layer._cuda_weight() is None
    assert [r.getMessage() for r in caplog.records] == [
        "PermutedSparseLinear(32 -> 16, torch.float16) stays on the dense path: device cpu is not CUDA "
        "(semi-structured kernels run on NVIDIA GPUs only)"]


# ----------------------------------------------------------------------------- real kernels (GPU)
def relative_error(actual, expected):
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


# Relative error of one fp16 / bf16 matmul against float64 on random data: inputs and output rounded to
# the dtype (unit roundoff 2^-11 / 2^-8), fp32 accumulation; the bound is about four roundoffs.
KERNEL_TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def require_kernel(weight):
    """Skip only on a GPU without sparse tensor cores; anywhere else a refusal of this supported layer fails."""
    if torch.cuda.get_device_capability(weight.device) < (8, 0):
        pytest.skip("compute capability < 8.0 has no sparse tensor cores")
    reason = semi_structured_support(weight.shape, weight.dtype, weight.device, 2, 4)
    assert reason is None, f"the 2:4 kernel refused a supported {tuple(weight.shape)} {weight.dtype} layer: {reason}"


@gpu
@needs_cuda
def test_gpu_backend_is_the_one_that_runs_on_this_card():
    """Hopper (9.x) and later run only cuSPARSELt; CUTLASS serves 8.x when cuSPARSELt is missing."""
    weight = masked_weight(64, 128, torch.float16, "cuda", seed=5)
    require_kernel(weight)
    backend, _ = cuda_sparse.select_backend(weight.device)
    if torch.cuda.get_device_capability(weight.device)[0] >= 9:
        assert backend is SparseSemiStructuredTensorCUSPARSELT
    assert type(compress_weight(weight)) is backend


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 13, 128])
def test_gpu_forward_matches_dense_masked_reference(dtype, tokens):
    weight = masked_weight(256, 512, dtype, "cuda", seed=2)
    require_kernel(weight)
    compressed = compress_weight(weight)
    bias = torch.randn(256, dtype=dtype, device="cuda")
    x = torch.randn(tokens, 3, 512, dtype=dtype, device="cuda")
    y = sparse_linear(x, compressed, lambda: weight, bias, min_tokens=1)
    reference = F.linear(x.double(), weight.double(), bias.double())
    assert y.shape == reference.shape and y.dtype == dtype
    assert relative_error(y, reference) < KERNEL_TOLERANCE[dtype]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_backward_matches_dense_autograd(dtype):
    weight = masked_weight(128, 256, dtype, "cuda", seed=3)
    require_kernel(weight)
    assert check_nm(weight, 2, 4)
    compressed = compress_weight(weight)
    x = torch.randn(4, 19, 256, dtype=dtype, device="cuda", requires_grad=True)
    grad_y = torch.randn(4, 19, 128, dtype=dtype, device="cuda")
    sparse_linear(x, compressed, lambda: weight, None, min_tokens=1).backward(grad_y)
    x_ref = x.detach().double().requires_grad_()
    F.linear(x_ref, weight.double()).backward(grad_y.double())
    assert relative_error(x.grad, x_ref.grad) < KERNEL_TOLERANCE[dtype]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype, shape", [(torch.float32, (64, 128)), (torch.float16, (24, 40))])
def test_gpu_unsupported_layer_falls_back_to_dense_and_logs_why(dtype, shape, caplog, monkeypatch):
    """fp32 (no 2:4 kernel) and a shape off the kernel's alignment run the dense masked path, and say why."""
    from optimum_permllm.nn import PermutedSparseLinear

    monkeypatch.setattr(cuda_sparse, "min_tokens_for", lambda out_features, in_features: 1)  # ask for the kernel
    torch.manual_seed(6)
    linear = torch.nn.Linear(shape[1], shape[0]).to("cuda", dtype)
    layer = PermutedSparseLinear.from_linear(linear, perm=torch.randperm(shape[1], device="cuda"))
    x = torch.randn(128, shape[1], dtype=dtype, device="cuda")
    with caplog.at_level("INFO", logger="optimum_permllm.nn.permuted_sparse_linear"):
        y = layer(x)
    assert layer._compressed is not None and layer._compressed[1] is None  # decided once: no kernel
    reason = semi_structured_support(shape, dtype, x.device, 2, 4)
    assert reason is not None and any(reason in record.getMessage() for record in caplog.records)
    reference = F.linear(x.double()[:, layer.input_perm], layer.permuted_dense_weight().double(), linear.bias.double())
    assert relative_error(y, reference) < (1e-5 if dtype == torch.float32 else KERNEL_TOLERANCE[dtype])


def test_module_builds_the_compressed_weight_only_for_calls_that_use_the_kernel(monkeypatch):
    """Below its threshold (or with another dtype) a layer stays on the dense path and never compresses, so
    decode holds no compressed copy; from the threshold on, the kernel path gets the compressed weight."""
    from optimum_permllm.nn import PermutedSparseLinear

    layer = PermutedSparseLinear.from_linear(torch.nn.Linear(32, 16), perm=torch.randperm(32))
    built = []
    monkeypatch.setattr(cuda_sparse, "min_tokens_for", lambda out_features, in_features: 8)
    monkeypatch.setattr(layer, "_cuda_weight", lambda: built.append(True) or layer.permuted_dense_weight())
    assert not layer._uses_kernel(torch.randn(7, 32)) and built == []
    assert not layer._uses_kernel(torch.randn(8, 32).double()) and built == []
    assert layer._uses_kernel(torch.randn(2, 4, 32)) and built == [True]


def test_dense_path_folds_the_permutation_into_its_cached_weight_and_follows_a_new_one():
    """The dense path is one matmul on the unpermuted input; an in-place change of input_perm (as
    load_state_dict makes) rebuilds the cached weight."""
    from optimum_permllm.nn import PermutedSparseLinear

    g = torch.Generator().manual_seed(4)
    layer = PermutedSparseLinear.from_linear(torch.nn.Linear(32, 16), perm=torch.randperm(32, generator=g))
    x = torch.randn(5, 32, generator=g, dtype=torch.float64)
    layer = layer.double()
    for perm in (layer.input_perm.clone(), torch.randperm(32, generator=g)):
        layer.input_perm.copy_(perm)
        reference = F.linear(x[:, perm], layer.permuted_dense_weight(), layer.bias)
        torch.testing.assert_close(layer(x), reference, rtol=1e-12, atol=1e-12)
