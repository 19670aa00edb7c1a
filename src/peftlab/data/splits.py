"""Deterministic choices of examples: a held-out validation split and a seeded subset.

Both depend only on the number of examples and a seed, so every method in a comparison sees the
same examples; the subset of ``k`` examples is contained in the subset of ``k + 1`` (same seed).
"""

from __future__ import annotations

import random

#: Fixed, and independent of the run's seed, so a held-out validation set is a property of the data.
HOLD_OUT_SEED = 0
HOLD_OUT_FRACTION = 0.1
SPLITS = ("train", "validation")


def hold_out(count: int, split: str, fraction: float = HOLD_OUT_FRACTION, seed: int = HOLD_OUT_SEED) -> list[int]:
    """Indices (ascending) of ``split`` when ``count`` examples are split into train and validation.

    Validation gets ``round(count * fraction)`` examples, at least one when there are two or more.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; use one of {', '.join(SPLITS)}")
    order = list(range(count))
    random.Random(seed).shuffle(order)
    validation_size = max(1, round(count * fraction)) if count >= 2 else 0
    chosen = order[:validation_size] if split == "validation" else order[validation_size:]
    return sorted(chosen)


def sample(count: int, max_samples: int | None, seed: int) -> list[int]:
    """Indices (ascending) of ``max_samples`` of ``count`` examples, drawn by a seeded shuffle; all if None."""
    if max_samples is None or max_samples >= count:
        return list(range(count))
    if max_samples < 1:
        raise ValueError(f"max_samples must be at least 1, got {max_samples}")
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return sorted(order[:max_samples])
