"""An offline instruction dataset made here, seeded: numbers to write out in English words.

    "number-words"   user: "Write 347 in words."   assistant: "three hundred forty-seven"

Each row is a chat conversation ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``,
so a chat model learns it through its own chat template, and the answer is short and checkable: the
held-out score is exact match on what the model writes (see :mod:`peftlab.train.generation_metrics`).
SmolLM2-135M-Instruct gets few of these right out of the box (it writes digits, says "and", or
capitalises and punctuates in its own way) and a LoRA learns the pattern in a few hundred steps.

The numbers are 1 .. 9,999 (hundreds and thousands, hyphens between tens and units, no "and"). The
splits never share a number: every number is shuffled once with a fixed seed (:data:`DATA_SEED`,
not the run's seed: the data set is the same for every run), the first :data:`VALIDATION_SIZE` are
the validation split and the next :data:`TRAIN_SIZE` the training split. A run's ``--seed`` then draws
its ``--max-train-samples`` from those, as for any data set.
"""

from __future__ import annotations

import random
from typing import Any

NUMBER_WORDS = "number-words"
#: The largest number asked about.
LARGEST = 9_999
DATA_SEED = 1234
VALIDATION_SIZE = 200
TRAIN_SIZE = 4_000
QUESTION = "Write {number} in words."

_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
          "sixteen seventeen eighteen nineteen").split()
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_in_words(number: int) -> str:
    """``number`` (0 .. 999,999) in English words: 347 -> "three hundred forty-seven"."""
    if not 0 <= number <= 999_999:
        raise ValueError(f"number_in_words covers 0 .. 999,999, got {number}")
    if number < 20:
        return _UNITS[number]
    if number < 100:
        tens, units = divmod(number, 10)
        return _TENS[tens] + (f"-{_UNITS[units]}" if units else "")
    if number < 1000:
        hundreds, rest = divmod(number, 100)
        return f"{_UNITS[hundreds]} hundred" + (f" {number_in_words(rest)}" if rest else "")
    thousands, rest = divmod(number, 1000)
    return f"{number_in_words(thousands)} thousand" + (f" {number_in_words(rest)}" if rest else "")


def conversation(question: str, answer: str) -> dict[str, Any]:
    """One chat row: the user's question and the assistant's answer."""
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def split_numbers(split: str) -> list[int]:
    """The numbers of ``split`` ("train" or "validation"), in their fixed shuffled order."""
    numbers = list(range(1, LARGEST + 1))
    random.Random(DATA_SEED).shuffle(numbers)
    if split == "validation":
        return numbers[:VALIDATION_SIZE]
    if split == "train":
        return numbers[VALIDATION_SIZE : VALIDATION_SIZE + TRAIN_SIZE]
    raise ValueError(f"Unknown split {split!r}; use train or validation")


def number_words_rows(split: str) -> list[dict[str, Any]]:
    """The chat rows of ``split`` of the number-words data set."""
    return [conversation(QUESTION.format(number=n), number_in_words(n)) for n in split_numbers(split)]


#: Offline instruction data sets by alias: the rows of a split.
SYNTHETIC_DATASETS = {NUMBER_WORDS: number_words_rows}
