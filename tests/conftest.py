"""Shared fixtures: tiny random decoder models of several families, built offline."""

import pytest
import torch

# Tiny configs of every decoder family the package must handle (widths are multiples of 8 so that
# 2:4 and 4:8 both apply).
TINY_CONFIGS = {
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)),
    "gemma": ("GemmaConfig", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=16)),
    # Gemma 3: q/k norms, four (1 + w) RMSNorms per layer (two of them after o_proj and down_proj), one KV
    # head whose width (32) is not hidden / heads (16), a sliding-window layer then a global one.
    "gemma3": ("Gemma3TextConfig", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1,
                                        head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
                                        layer_types=["sliding_attention", "full_attention"])),
    "opt": ("OPTConfig", dict(hidden_size=64, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4)),
}
FAMILIES = list(TINY_CONFIGS)


def tiny_model(family: str = "llama", layers: int = 2, vocab: int = 128, seed: int = 0, dtype=torch.float32):
    """A tiny randomly initialised causal LM of the given family, in eval mode."""
    import transformers

    config_name, kwargs = TINY_CONFIGS[family]
    config = getattr(transformers, config_name)(vocab_size=vocab, num_hidden_layers=layers,
                                                 max_position_embeddings=128, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    _randomise_norms(model, torch.Generator().manual_seed(seed))
    return model


@torch.no_grad()
def _randomise_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every norm distinct per-channel weights (and biases): initialised to ones (or zeros for Gemma's
    1 + w), a norm whose weight was not moved with a permutation would go unnoticed."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            continue
        for param in module.parameters(recurse=False):
            if param.dim() == 1:
                param.add_(0.3 * torch.randn(param.shape, generator=generator).to(param.dtype))


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, then the previous count: tiny tensor ops on a shared 2-core machine
    run up to 30x faster on one thread, and the setting is process-wide, so it must not leak."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


def save_tiny_dense(folder, family: str = "qwen2"):
    """Save a tiny random model with the offline tiny tokenizer as a model folder; returns the tokenizer."""
    from .data.tiny_text import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tiny_model(family, vocab=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.fixture
def kernel_calls(monkeypatch):
    """Record the layer calls that the 2:4 CUDA kernel serves: {PermutedSparseLinear: [relative error of each
    call against the float64 dense masked matmul of the same input]}. The dispatch threshold is set to 64
    tokens for every shape, so test inputs of 64 tokens or more reach the kernel."""
    from optimum_permllm.nn import cuda_sparse

    calls, served = {}, []
    sparse_linear, apply = cuda_sparse.sparse_linear, cuda_sparse.SemiStructuredMatmul.apply

    def counted_apply(*args):
        served.append(True)
        return apply(*args)

    def recorded(x, compressed, dense_weight_fn, bias, min_tokens):
        before = len(served)
        y = sparse_linear(x, compressed, dense_weight_fn, bias, min_tokens)
        if len(served) > before:
            with torch.no_grad():
                reference = torch.nn.functional.linear(x.double(), dense_weight_fn().double(),
                                                       None if bias is None else bias.double())
                error = float((y.double() - reference).norm() / reference.norm())
            calls.setdefault(getattr(dense_weight_fn, "__self__", dense_weight_fn), []).append(error)
        return y

    monkeypatch.setattr(cuda_sparse.SemiStructuredMatmul, "apply", counted_apply)
    monkeypatch.setattr(cuda_sparse, "sparse_linear", recorded)
    monkeypatch.setattr(cuda_sparse, "min_tokens_for", lambda out_features, in_features: 64)
    return calls
