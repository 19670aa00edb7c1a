"""Evaluation by what a model answers: held-out questions, the model's greedy answers, their scores.

Each held-out row gives a question and its reference answer: a chat row's conversation up to its last
assistant turn (the template applied, as in training) and that turn's text; a ``{"prompt", "response"}``
row's prompt (as plain text, as the collator trains it) and response. The scores are
:mod:`peftlab.train.generation_metrics`'s normalised exact match and contains-answer. With an adapter the
base model answers the same questions with the adapter switched off, so the two scores sit side by side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from torch import nn
from transformers import PreTrainedTokenizerBase

from peftlab.data.errors import DataError
from peftlab.train.generation import Prompt, Sampling, encode_prompt, generate_texts, prompt_text
from peftlab.train.generation_metrics import contains_answer, exact_match, generation_scores

#: Tokens an answer may take in the evaluation unless told (the built-in data's answers take under 16).
DEFAULT_EVAL_NEW_TOKENS = 32


@dataclass(frozen=True)
class Question:
    """A held-out question: what the model is asked, and the answer it should give."""

    prompt: Prompt
    reference: str
    chat: bool  # a conversation: the chat template applies


def held_out_questions(dataset: Sequence[dict[str, Any]], source: str = "the evaluation set") -> list[Question]:
    """The questions of a causal-LM dataset's rows (chat ``messages`` or ``prompt``/``response``)."""
    questions = []
    for index in range(len(dataset)):
        item = dataset[index]
        if "messages" in item:
            messages = list(item["messages"])
            last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
            if last is None:
                raise DataError(f"{source}, row {index + 1}: a conversation without an assistant turn has no answer to score")
            questions.append(Question(messages[:last], messages[last]["content"], chat=True))
        elif "prompt" in item and "response" in item and str(item["prompt"]).strip():
            questions.append(Question(item["prompt"], item["response"], chat=False))
        else:
            raise DataError(f"{source}: rows of plain text (no prompt) have no question and answer to score; "
                            "evaluate them by perplexity (--task causal-lm), or give chat or prompt/response rows")
    if not questions:
        raise DataError(f"{source} has no rows to evaluate")
    return questions


def question_ids(tokenizer: PreTrainedTokenizerBase, question: Question) -> list[int]:
    if question.chat:
        return encode_prompt(tokenizer, question.prompt)
    return tokenizer(question.prompt, add_special_tokens=True)["input_ids"]


def answer_questions(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, questions: Sequence[Question], sampling: Sampling,
    batch_size: int = 16,
) -> list[str]:
    prompts = [question_ids(tokenizer, question) for question in questions]
    return generate_texts(model, tokenizer, prompts, sampling, batch_size, progress=True)


def score_answers(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, questions: Sequence[Question], sampling: Sampling,
    batch_size: int = 16, with_base: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(scores, rows)``: ``{"exact_match", "contains_answer"}`` of the model (and ``base_exact_match``,
    ``base_contains_answer`` of its base with the adapter off, when it has one and ``with_base``), and
    a row per question with both answers, for the generations file."""
    answers = answer_questions(model, tokenizer, questions, sampling, batch_size)
    references = [question.reference for question in questions]
    scores: dict[str, Any] = generation_scores(answers, references)
    base_answers = None
    if with_base and hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            base_answers = answer_questions(model, tokenizer, questions, sampling, batch_size)
        scores.update({f"base_{key}": value for key, value in generation_scores(base_answers, references).items()})
    rows = []
    for i, (question, answer) in enumerate(zip(questions, answers)):
        row = {"prompt": prompt_text(question.prompt), "reference": question.reference, "generation": answer,
               "exact_match": exact_match(answer, question.reference),
               "contains_answer": contains_answer(answer, question.reference)}
        if base_answers is not None:
            row.update(base_generation=base_answers[i], base_exact_match=exact_match(base_answers[i], question.reference))
        rows.append(row)
    return scores, rows


def write_generations(path: Path, rows: Sequence[dict[str, Any]], overwrite: bool = False) -> None:
    """The answers as JSON lines, written whole (atomically); an existing file only with ``overwrite``."""
    from peftlab.io import atomic_write_text
    from peftlab.train.options import OptionsError

    if path.exists() and not overwrite:
        raise OptionsError(f"{path} exists; give another --generations file, or --overwrite to replace it.")
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
