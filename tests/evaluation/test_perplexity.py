"""Perplexity against a brute-force, one-window-at-a-time computation on a tiny random LLaMA."""

import math

import pytest
import torch

from optimum_permllm.evaluation import kl_divergence, perplexity
from tests.data.tiny_text import SENTENCES, tiny_llama

TEXT = " ".join(SENTENCES * 3)



def brute_force_ppl(model, ids, seq_len, stride):
    """Hugging Face's sliding-window recipe, one window at a time, with log_softmax and explicit sums."""
    total, count, previous_end = 0.0, 0, 0
    for begin in range(0, len(ids) - seq_len + 1, stride):
        window = ids[begin : begin + seq_len]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
        for position in range(1, seq_len):
            if begin + position >= previous_end:  # each token is predicted once
                total -= logprobs[position - 1, window[position]].item()
                count += 1
        previous_end = begin + seq_len
    return math.exp(total / count)


def test_token_count_is_long_enough(tokenizer):
    assert len(tokenizer(TEXT, add_special_tokens=False)["input_ids"]) > 200


@pytest.mark.parametrize("batch_size", [1, 3])
def test_non_overlapping_windows_match_brute_force(model, tokenizer, batch_size):
    ids = torch.tensor(tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    expected = brute_force_ppl(model, ids, seq_len=32, stride=32)
    assert perplexity(model, tokenizer, TEXT, seq_len=32, batch_size=batch_size) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("stride", [8, 31])
def test_sliding_windows_match_brute_force(model, tokenizer, stride):
    ids = torch.tensor(tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    expected = brute_force_ppl(model, ids, seq_len=32, stride=stride)
    got = perplexity(model, tokenizer, TEXT, seq_len=32, stride=stride, batch_size=4)
    assert got == pytest.approx(expected, rel=1e-5)


def test_max_windows_and_bos(model, tokenizer):
    ids = torch.tensor(tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    assert perplexity(model, tokenizer, TEXT, seq_len=16, max_windows=2) == pytest.approx(
        brute_force_ppl(model, ids[:32], seq_len=16, stride=16), rel=1e-5
    )
    with_bos = torch.cat([torch.tensor([tokenizer.bos_token_id]), ids])
    assert perplexity(model, tokenizer, TEXT, seq_len=16, add_bos=True) == pytest.approx(
        brute_force_ppl(model, with_bos, seq_len=16, stride=16), rel=1e-5
    )


def test_restores_training_mode_and_keeps_weights(model, tokenizer):
    model.train()
    before = [p.clone() for p in model.parameters()]
    perplexity(model, tokenizer, TEXT, seq_len=16, max_windows=1)
    assert model.training
    model.eval()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_uniform_model_has_vocabulary_perplexity(tokenizer):
    model = tiny_llama(len(tokenizer))
    torch.nn.init.zeros_(model.lm_head.weight)  # every logit equal: perplexity = vocabulary size
    assert perplexity(model, tokenizer, TEXT, seq_len=16) == pytest.approx(model.config.vocab_size, rel=1e-5)


def brute_force_kl(model, reference, ids, seq_len):
    """Mean KL(reference || model) over the predictions of non-overlapping windows, in float64."""
    total, count = 0.0, 0
    for begin in range(0, len(ids) - seq_len + 1, seq_len):
        window = ids[begin : begin + seq_len][None]
        with torch.no_grad():
            logp = torch.log_softmax(model(window).logits[0, :-1].double(), dim=-1)
            logq = torch.log_softmax(reference(window).logits[0, :-1].double(), dim=-1)
        total += (logq.exp() * (logq - logp)).sum().item()
        count += seq_len - 1
    return total / count


def test_kl_divergence_matches_brute_force_and_is_zero_against_itself(model, tokenizer):
    ids = torch.tensor(tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    other = tiny_llama(len(tokenizer), seed=1)
    expected = brute_force_kl(other, model, ids, seq_len=32)
    assert expected > 1e-4
    assert kl_divergence(other, model, tokenizer, TEXT, seq_len=32) == pytest.approx(expected, rel=1e-4)
    assert kl_divergence(model, model, tokenizer, TEXT, seq_len=32) == pytest.approx(0.0, abs=1e-6)


def test_bad_arguments(model, tokenizer):
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, tokenizer, "short text", seq_len=64)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tokenizer, TEXT, seq_len=16, stride=17)


@pytest.mark.slow
def test_smollm2_perplexity_on_held_out_wikipedia():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_permllm.data import smollm2_model_dir

    folder = smollm2_model_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ppl = perplexity(model, AutoTokenizer.from_pretrained(folder), seq_len=512, max_windows=8, batch_size=4)
    assert 10 < ppl < 40  # dense SmolLM2-135M: about 22 on the whole evaluation part
