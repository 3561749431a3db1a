"""Zero-shot scoring against brute force and lm-eval, and each task's formatter on a real row."""

import sys

import pytest
import torch

from optimum_permllm.evaluation import lm_eval_model, zero_shot
from optimum_permllm.evaluation import zeroshot as zs
from tests.data.tiny_text import tiny_llama


REQUESTS = [
    ("Question: How do I boil water?\nAnswer:", " Put it in a pot on the stove."),
    ("The quick brown", " fox jumps"),
    ("A man is sitting ", "on a roof."),  # trailing space moves to the continuation
    ("Albedo is the diffuse reflectivity or reflecting power of a surface, and", " then"),
]



def brute_force_loglikelihood(model, tokenizer, context, continuation):
    """Sum of log p(continuation token | everything before), one unpadded sequence at a time."""
    context_ids, continuation_ids = zs.encode_pair(tokenizer, context, continuation)
    ids = torch.tensor(context_ids + continuation_ids)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids[None]).logits[0].double(), dim=-1)
    start = len(context_ids)
    return sum(logprobs[t - 1, ids[t]].item() for t in range(start, len(ids)))


def test_encode_pair_moves_trailing_spaces(tokenizer):
    context_ids, continuation_ids = zs.encode_pair(tokenizer, "A man is sitting ", "on a roof.")
    assert tokenizer.decode(context_ids) == "A man is sitting"
    assert tokenizer.decode(continuation_ids) == " on a roof."
    assert zs.encode_pair(tokenizer, "", "hello")[0] == [tokenizer.bos_token_id]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_batched_loglikelihoods_match_brute_force(model, tokenizer, batch_size):
    expected = torch.tensor([brute_force_loglikelihood(model, tokenizer, *r) for r in REQUESTS], dtype=torch.float64)
    got = zs.loglikelihoods(model, tokenizer, REQUESTS, batch_size=batch_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_long_context_is_cut_on_the_left(tokenizer):
    short = tiny_llama(len(tokenizer), max_positions=8)
    context, continuation = REQUESTS[3]
    context_ids, continuation_ids = zs.encode_pair(tokenizer, context, continuation)
    ids = torch.tensor((context_ids + continuation_ids)[-9:])
    with torch.no_grad():
        logprobs = torch.log_softmax(short(ids[None, :-1]).logits[0].double(), dim=-1)
    n = len(continuation_ids)
    expected = logprobs[-n:].gather(1, ids[-n:, None]).sum()
    got = zs.loglikelihoods(short, tokenizer, [(context, continuation)])
    torch.testing.assert_close(got, expected[None], rtol=1e-5, atol=1e-4)


def test_choice_scores_normalise_by_characters():
    question = zs.MultipleChoice(("c", "c"), ("ab", "abcd"), gold=1)
    loglik = torch.tensor([-2.0, -3.0], dtype=torch.float64)
    assert zs.choice_scores(question, loglik).tolist() == [-1.0, -0.75]
    plain = zs.MultipleChoice(("c", "c"), ("ab", "abcd"), gold=0, normalize=False)
    assert zs.choice_scores(plain, loglik).tolist() == [-2.0, -3.0]


def test_accuracy_is_argmax_of_brute_force_scores(model, tokenizer):
    questions = [
        zs.MultipleChoice(("The quick brown",) * 3, ("fox jumps", "dog", "surface of the roof"), gold=g)
        for g in range(3)
    ] + [zs.MultipleChoice(("A man is", "Sarah was"), ("sitting on a roof.",) * 2, gold=1, normalize=False)]
    expected = 0
    for question in questions:
        loglik = torch.tensor([brute_force_loglikelihood(model, tokenizer, *r) for r in question.requests()])
        expected += int(zs.choice_scores(question, loglik.double()).argmax() == question.gold)
    assert zs.accuracy(model, tokenizer, questions, batch_size=4) == expected / len(questions)


def test_hellaswag_cleaning():
    assert zs._hellaswag_clean(" How to cook [title] Boil water [step] now.  Done ") == "How to cook. Boil water now. Done"


def _first(task):
    import datasets

    return datasets.load_from_disk(str(zs.task_dataset_path(task)))[0]


@pytest.mark.parametrize(
    "task, context, choice, gold",
    [
        ("hellaswag", "Roof shingle removal: A man is sitting on a roof. He", "starts pulling up roofing on a roof.", 3),
        ("piqa", "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:", None, 0),
        ("arc_easy", "Question: Which technology was developed most recently?\nAnswer:", "cellular telephone", 0),
        ("arc_challenge", None, "Record the details of the investigation.", 3),
        ("openbookqa", None, "Deep sea animals", 0),
        ("boolq", None, "no", 0),
    ],
)
def test_formatters_on_a_real_row(task, context, choice, gold):
    row = _first(task)
    question = zs.TASKS[task].format(row)
    assert question.gold == gold
    if context is not None:
        assert set(question.contexts) == {context}
    if choice is not None:
        assert question.choices[gold] == choice
    contexts, continuations = zip(*question.requests())
    assert all(c.startswith(" ") and not c.startswith("  ") for c in continuations)
    if task == "boolq":
        assert contexts[0] == f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
        assert continuations == (" no", " yes") and not question.normalize


def test_winogrande_partial_scoring_on_a_real_row():
    question = zs.format_winogrande(_first("winogrande"))
    assert question.contexts == (
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    )
    assert question.requests()[0][1] == " always got the easier cases." and question.gold == 1


def test_zero_shot_on_every_task(model, tokenizer):
    results = zero_shot(model, tokenizer, limit=2, batch_size=8)
    assert list(results) == list(zs.DEFAULT_TASKS) + ["average"]
    assert all(value in (0.0, 0.5, 1.0) for task, value in results.items() if task != "average")
    assert results["average"] == pytest.approx(sum(results[t] for t in zs.DEFAULT_TASKS) / len(zs.DEFAULT_TASKS))


def test_unknown_task(model, tokenizer):
    with pytest.raises(ValueError, match="hellaswag"):
        zero_shot(model, tokenizer, tasks=("mmlu",))


def test_lm_eval_missing_names_the_install(monkeypatch, model, tokenizer):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.setitem(sys.modules, "lm_eval.models", None)
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", None)
    with pytest.raises(ImportError, match="pip install lm-eval"):
        lm_eval_model(model, tokenizer)


def test_lm_eval_adapter_agrees_with_our_scoring(model, tokenizer):
    from lm_eval.api.instance import Instance  # installed by the test setup (the `test` extra)

    lm = lm_eval_model(model, tokenizer, batch_size=2)
    instances = [Instance("loglikelihood", doc={}, arguments=r, idx=i) for i, r in enumerate(REQUESTS)]
    theirs = torch.tensor([loglik for loglik, _ in lm.loglikelihood(instances, disable_tqdm=True)], dtype=torch.float64)
    torch.testing.assert_close(zs.loglikelihoods(model, tokenizer, REQUESTS), theirs, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_smollm2_piqa_is_well_above_chance():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_permllm.data import smollm2_model_dir

    folder = smollm2_model_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    results = zero_shot(model, AutoTokenizer.from_pretrained(folder), tasks=("piqa",), limit=60)
    assert results["piqa"] > 0.55  # dense SmolLM2-135M: about 0.67 on the first 300
