"""PermutedOutputNorm: exact against norm(x)[..., perm] for every norm family, checkpoint keys kept."""

import pytest
import torch
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from optimum_permllm.nn.permuted_norm import PermutedOutputNorm, norm_kind

WIDTH = 24


class ScaledTanhNorm(nn.Module):
    """A norm the fused kernel does not know, with a buffer and a child module."""

    def __init__(self, width):
        super().__init__()
        self.inner = nn.Linear(width, width, bias=False)
        self.scale = nn.Parameter(torch.ones(width))
        self.register_buffer("offset", torch.zeros(width))

    def forward(self, x):
        return torch.tanh(self.inner(x)) * self.scale + self.offset


NORMS = {
    "llama": (lambda: LlamaRMSNorm(WIDTH, eps=1e-6), "rms"),
    "qwen2": (lambda: Qwen2RMSNorm(WIDTH, eps=1e-6), "rms"),
    "gemma": (lambda: GemmaRMSNorm(WIDTH, eps=1e-6), "rms_one_plus"),
    "gemma3": (lambda: Gemma3RMSNorm(WIDTH, eps=1e-6), "rms_one_plus"),
    "layernorm": (lambda: nn.LayerNorm(WIDTH), "layer"),
    "layernorm_no_affine": (lambda: nn.LayerNorm(WIDTH, elementwise_affine=False), "layer"),
    "layernorm_no_bias": (lambda: nn.LayerNorm(WIDTH, bias=False), "layer"),
    "torch_rmsnorm": (lambda: nn.RMSNorm(WIDTH, eps=1e-6), None),
    "unknown": (lambda: ScaledTanhNorm(WIDTH), None),
}


def random_norm(name, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    norm = NORMS[name][0]().to(dtype)
    with torch.no_grad():
        for tensor in list(norm.parameters()) + list(norm.buffers()):
            tensor.normal_()
    return norm


@pytest.mark.parametrize("name", list(NORMS))
def test_kind_detection(name):
    assert norm_kind(NORMS[name][0]()) == NORMS[name][1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(NORMS))
def test_forward_is_bit_exact_with_the_permuted_norm(name, dtype):
    norm = random_norm(name, dtype)
    perm = torch.randperm(WIDTH)
    x = torch.randn(2, 5, WIDTH).to(dtype)
    with torch.no_grad():
        expected = norm(x).index_select(-1, perm)
        assert torch.equal(PermutedOutputNorm(norm, perm)(x), expected)


@pytest.mark.parametrize("name", list(NORMS))
def test_state_dict_keeps_the_norm_keys_and_adds_output_perm(name):
    norm = random_norm(name)
    wrapped = PermutedOutputNorm(norm, torch.randperm(WIDTH))
    keys = set(wrapped.state_dict())
    assert keys == set(norm.state_dict()) | {"output_perm"}
    for key, value in norm.state_dict().items():
        assert torch.equal(wrapped.state_dict()[key], value)


@pytest.mark.parametrize("name", ["llama", "gemma", "layernorm", "unknown"])
def test_loading_a_checkpoint_changes_the_output(name):
    source = PermutedOutputNorm(random_norm(name, seed=1), torch.randperm(WIDTH))
    target = PermutedOutputNorm(random_norm(name, seed=2), torch.arange(WIDTH))
    x = torch.randn(3, WIDTH)
    target.load_state_dict(source.state_dict())
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
    # assign=True replaces the Parameter objects: the output must follow them, not the old ones.
    other = PermutedOutputNorm(random_norm(name, seed=3), torch.arange(WIDTH))
    other.load_state_dict(source.state_dict(), assign=True)
    with torch.no_grad():
        assert torch.equal(other(x), source(x))


def test_unwrap_returns_the_norm_with_current_tensors():
    source = PermutedOutputNorm(random_norm("llama", seed=1), torch.randperm(WIDTH))
    wrapped = PermutedOutputNorm(random_norm("llama", seed=2), torch.arange(WIDTH))
    wrapped.load_state_dict(source.state_dict(), assign=True)
    plain = wrapped.unwrap()
    x = torch.randn(3, WIDTH)
    with torch.no_grad():
        assert torch.equal(plain(x).index_select(-1, source.output_perm), source(x))


def test_bad_permutation_is_refused():
    with pytest.raises(ValueError, match="bijection"):
        PermutedOutputNorm(random_norm("llama"), torch.zeros(WIDTH, dtype=torch.long))


def test_gradients_reach_the_input_and_the_weight():
    wrapped = PermutedOutputNorm(random_norm("gemma"), torch.randperm(WIDTH))
    x = torch.randn(4, WIDTH, requires_grad=True)
    wrapped(x).square().sum().backward()
    reference = random_norm("gemma")
    x_ref = x.detach().clone().requires_grad_()
    reference(x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(wrapped.weight.grad, reference.weight.grad)
