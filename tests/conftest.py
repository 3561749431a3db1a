"""Shared fixtures: tiny random decoder models of several families, built offline."""

import pytest
import torch

# Tiny configs of every decoder family the package must handle (widths are multiples of 8 so that
# 2:4 and 4:8 both apply).
TINY_CONFIGS = {
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)),
    "gemma": ("GemmaConfig", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=16)),
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
    return model


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
