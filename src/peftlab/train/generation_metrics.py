"""Scores of generated answers against reference answers: normalised exact match and contains-answer.

Both compare normalised text, as SQuAD's evaluation does, with one change for answers written out in
words: punctuation becomes a space instead of vanishing, so "forty-seven" and "forty seven" agree
(SQuAD would make the first "fortyseven"). :func:`normalize`:

    1. lowercase ("Three" -> "three")
    2. every punctuation character (Unicode category P*, and symbols S*) -> a space
    3. drop the articles "a", "an", "the" as whole words
    4. collapse runs of whitespace to one space, strip the ends

``exact_match``: the normalised generation equals the normalised reference. ``contains_answer``: the
normalised reference occurs in the normalised generation as whole words ("forty seven" is in "it is
forty seven", not in "forty seventy"); an empty reference is contained in nothing. A figure over a set
is the mean, 0..1.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    lowered = text.lower()
    spaced = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in lowered)
    return " ".join(_ARTICLES.sub(" ", spaced).split())


def exact_match(generation: str, reference: str) -> bool:
    return normalize(generation) == normalize(reference)


def contains_answer(generation: str, reference: str) -> bool:
    answer = normalize(reference)
    return bool(answer) and f" {answer} " in f" {normalize(generation)} "


def generation_scores(generations: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``{"exact_match", "contains_answer"}``: the share of generations that score, 0..1."""
    if len(generations) != len(references):
        raise ValueError(f"{len(generations)} generations for {len(references)} references")
    if not references:
        raise ValueError("no answers to score: the evaluation set is empty")
    count = len(references)
    return {
        "exact_match": sum(map(exact_match, generations, references)) / count,
        "contains_answer": sum(map(contains_answer, generations, references)) / count,
    }
