"""Data that cannot mean what the user thinks: refused, or named with a count.

    check_training_classes(train)         # a classifier needs two classes to learn anything
    texts = checked_texts(texts, rows)     # blank texts counted; above BLANK_SHARE_LIMIT refused
    duplicate_names(["text", "label", "label"])   # -> ["label"]: a file's column given twice
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from ..assets import notice
from .errors import DataError

#: Above this share of blank texts the file is refused: it is likely read wrong (a wrong column,
#: a shifted delimiter), and a model trained on it learns the label prior from empty inputs.
BLANK_SHARE_LIMIT = 0.05


def duplicate_names(names: Sequence[str]) -> list[str]:
    """The names that occur more than once, in order of first occurrence."""
    counts = Counter(names)
    return [name for name in dict.fromkeys(names) if counts[name] > 1]


def checked_texts(texts: list[str], wheres: Sequence[str], column: str, source: str) -> list[str]:
    """``texts`` unchanged; blank ones (empty or only whitespace) are counted in a notice, and
    refused when more than :data:`BLANK_SHARE_LIMIT` of them are blank."""
    blank = [where for text, where in zip(texts, wheres) if not text.strip()]
    if not blank:
        return texts
    share = len(blank) / len(texts)
    if share > BLANK_SHARE_LIMIT:
        raise DataError(
            f"{source}: {len(blank)} of {len(texts)} rows ({share:.0%}) have a blank {column!r} (first: {blank[0]}); "
            f"more than {BLANK_SHARE_LIMIT:.0%} blank usually means the file is read wrong (column, delimiter). "
            "Fill in or delete those rows."
        )
    notice(f"{source}: {len(blank)} of {len(texts)} rows have a blank {column!r} (first: {blank[0]}); kept as empty inputs")
    return texts


def check_training_classes(labels: Sequence[int], label_names: Sequence[str], source: str) -> None:
    """A training set whose examples all have one class teaches a classifier nothing but that class."""
    present = sorted(set(labels))
    if len(present) == 1:
        raise DataError(
            f"{source}: every training example has the class {label_names[present[0]]!r}; a classifier needs "
            "examples of at least two classes. Add examples of the other classes (check the label column)."
        )
