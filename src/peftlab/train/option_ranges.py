"""The range each numeric option must be in, as one table: a value outside it means nothing (a
negative gradient-norm limit trains by gradient ascent, momentum 1 never forgets) and is refused,
whether it came from a flag, a YAML file or ``TrainOptions(...)`` in Python.

    error = range_error("momentum", 1.0)    # "momentum must be in [0, 1), got 1.0."

The methods' own options carry their range with them (``MethodOption.check``); this table is for
the run's options.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Range:
    requirement: str  # what ``valid`` checks, for the message
    valid: Callable[[Any], bool]


POSITIVE = Range("positive", lambda v: v > 0)
AT_LEAST_ZERO = Range(">= 0", lambda v: v >= 0)
FRACTION = Range("in [0, 1)", lambda v: 0 <= v < 1)

#: option (its field or flag name, underscores) -> the values it may take; ``None`` (unset) always may.
OPTION_RANGES: dict[str, Range] = {
    **{name: POSITIVE for name in (
        "max_length", "epochs", "batch_size", "grad_accum", "eval_batch_size", "log_every", "max_train_samples",
        "max_eval_samples", "max_steps", "eval_every", "save_every", "lr")},
    "weight_decay": AT_LEAST_ZERO,
    "max_grad_norm": Range(">= 0 (0 turns clipping off; a negative limit would ascend the gradient)", lambda v: v >= 0),
    "momentum": FRACTION,
    "warmup_ratio": FRACTION,
}


def range_error(name: str, value: Any) -> str | None:
    """The message for ``value`` outside ``name``'s range, or None (also for options without one)."""
    allowed = OPTION_RANGES.get(name)
    if value is None or allowed is None or allowed.valid(value):
        return None
    return f"{name} must be {allowed.requirement}, got {value}."
