"""Fixtures of the evaluation tests: a tiny offline tokenizer and a tiny random LLaMA sized to it."""

import pytest

from tests.data.tiny_text import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(len(tokenizer))
