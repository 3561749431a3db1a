"""Offline test helpers: a byte-level BPE tokenizer trained in memory and a tiny random LLaMA."""

from __future__ import annotations

import functools

import torch

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is sitting on a roof. He starts pulling up roofing on a roof.",
    "Question: How do I boil water?\nAnswer: Put it in a pot on the stove.",
    "Anarchism is a political philosophy that advocates self-governed societies.",
    "Sarah was a much better surgeon than Maria so she always got the easier cases.",
    "Albedo is the diffuse reflectivity or reflecting power of a surface.",
]


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A byte-level BPE tokenizer (any text encodes, no unknown token) with BOS, EOS and PAD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<bos>", "<eos>", "<pad>"],
        show_progress=False,
    )
    backend.train_from_iterator(SENTENCES, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def tiny_llama(vocab_size: int, seed: int = 0, max_positions: int = 256):
    """A 2-layer random LlamaForCausalLM in eval mode, float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()
